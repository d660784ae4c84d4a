"""utils.cli.run_cli: the user's errors (UserError and the domain errors built on it) give one line and exit
code 2; any other exception, a plain ValueError or KeyError included, is a bug and keeps its traceback."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msretrieval.utils.cli import USER_ERRORS, RunStopped, run_cli
from msretrieval.utils.errors import UserError
from tests.conftest import run_script

REPO = Path(__file__).resolve().parents[2]


def _raise(error: BaseException):
    def main() -> int:
        raise error
    return main


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    assert run_cli(_raise(UserError("bad flag x"))) == 2
    assert capsys.readouterr().err == "error: bad flag x\n"


@pytest.mark.parametrize("error", [ValueError("internal bug"), KeyError("internal bug"), IndexError("internal bug")])
def test_a_plain_value_or_key_error_is_a_bug_and_propagates(capsys, error):
    with pytest.raises(type(error), match="internal bug"):
        run_cli(_raise(error))
    assert "error:" not in capsys.readouterr().err  # not reported as the user's error


def test_user_errors_do_not_take_in_every_value_error():
    assert not issubclass(ValueError, USER_ERRORS) and not issubclass(KeyError, USER_ERRORS)
    assert ValueError not in USER_ERRORS and KeyError not in USER_ERRORS
    assert issubclass(UserError, ValueError)  # existing `except ValueError` handlers still catch it


def test_domain_errors_are_user_errors():
    from msretrieval.baselines.msbd.saliency import SaliencyUnavailable
    from msretrieval.data.boxes import BoxCSVError
    from msretrieval.data.clutter import ClutterError
    from msretrieval.data.download import PrepareError
    from msretrieval.data.images import ImageLoadError
    from msretrieval.data.manifest import ManifestError
    from msretrieval.data.revisitop import RevisitopError
    from msretrieval.models.backbones import WeightsError
    from msretrieval.models.retrieval_net import UnsafeCheckpointError
    from msretrieval.release.format import ReleaseError
    from msretrieval.retrieval.aggregation.regional import DetectorMissing
    from msretrieval.training.data import BadTrainingData
    from msretrieval.training.trainer import TrainingDiverged
    from msretrieval.utils.config import ConfigError

    for cls in (ManifestError, BoxCSVError, ClutterError, RevisitopError, ConfigError, ReleaseError, DetectorMissing,
                UnsafeCheckpointError, ImageLoadError, WeightsError, SaliencyUnavailable, PrepareError):
        assert issubclass(cls, UserError), cls
    for cls in (RunStopped, BadTrainingData, TrainingDiverged):  # deliberate stops, not bad values
        assert issubclass(cls, USER_ERRORS) and not issubclass(cls, ValueError), cls
    # the original bases are kept: `except RuntimeError` / `except ImportError` still catch them
    assert issubclass(ImageLoadError, RuntimeError) and issubclass(WeightsError, RuntimeError)
    assert issubclass(SaliencyUnavailable, ImportError)
    assert str(ImageLoadError("a.jpg", "truncated")) == "cannot load image a.jpg: truncated"
    assert PrepareError("no network", code=3).exit_code == 3


def _manifest(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"img/{i}.png")
        rows.append((f"img/{i}.png", i % 2 + 1))
    with (folder / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("file", "class_id"), *rows])
    return folder / "labels.csv"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("case", ["method", "benchmark"])
def test_evaluate_reports_a_bad_name_in_one_line(tmp_path, case, capsys):
    benchmark = f"csv:{_manifest(tmp_path / 'set')}" if case == "method" else "no_such_benchmark"
    method = "no_such_method" if case == "method" else "gem"
    argv = ["--benchmark", benchmark, "--method", method, "--backbone", "resnet18", "--random-init", "--cache-dir",
            "", "--out", str(tmp_path / "out.json")]
    if case == "method":  # in-process (the message is what is checked): no interpreter start-up
        returncode, _, stderr = run_script("evaluate", argv, capsys)
    else:  # once through the real command line: its __main__ reports the error the same way
        done = _run(str(REPO / "scripts/evaluate.py"), *argv)
        returncode, stderr = done.returncode, done.stderr
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, stderr
    assert f"unknown {case} {'no_such_' + case!r}" in error_lines[0]
    assert not (tmp_path / "out.json").exists()


def test_search_reports_a_bad_flag_in_one_line(tmp_path, capsys):
    returncode, _, stderr = run_script("search", [tmp_path / "index", tmp_path / "q.jpg", "--k", "0"], capsys)
    assert returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: --k must be >= 1, got 0"


def test_a_bug_in_an_entry_point_shows_its_traceback():
    done = _run("-c", "import sys; from msretrieval.utils.cli import run_cli\n"
                      "def main():\n    return {}['internal']\n"
                      "sys.exit(run_cli(main))")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'internal'" in done.stderr
    assert "error:" not in done.stderr
