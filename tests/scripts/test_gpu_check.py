"""scripts/gpu_check.py's own logic, without running its checks (``--allow-cpu`` runs them all, minutes): which
mixed precisions are skipped where, how a check's outcome becomes PASS / SKIP / FAIL, and the table."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_fp16_is_skipped_on_the_cpu_and_bf16_where_the_gpu_lacks_it(gpu_check):
    skip = gpu_check.precision_skip
    assert skip("fp16", gpus=0, bf16_on_gpu=False) == "fp16 autocast needs CUDA (on the CPU accelerate would " \
                                                      "train in fp32)"
    assert skip("bf16", gpus=0, bf16_on_gpu=False) is None  # bf16 autocast runs on the CPU
    assert skip("fp16", gpus=1, bf16_on_gpu=False) is None
    assert skip("bf16", gpus=2, bf16_on_gpu=False) == "this GPU has no bf16"
    assert skip("bf16", gpus=1, bf16_on_gpu=True) is None


def test_outcomes_and_the_table(gpu_check):
    def skipped():
        raise gpu_check.Skipped("needs 2 GPUs")

    def failed():
        raise gpu_check.CheckFailed("exit code 1: train.py\nTraceback ...")

    def buggy():
        raise KeyError("results")

    results = [gpu_check.run_check("train", lambda: "losses [1.0]"), gpu_check.run_check("two", skipped),
               gpu_check.run_check("fp16", failed), gpu_check.run_check("evaluate", buggy)]
    assert [(r.name, r.status, r.detail) for r in results] == [
        ("train", "PASS", "losses [1.0]"), ("two", "SKIP", "needs 2 GPUs"),
        ("fp16", "FAIL", "exit code 1: train.py\nTraceback ..."), ("evaluate", "FAIL", "KeyError: 'results'")]
    for result in results:
        result.seconds = 1.25
    assert gpu_check.format_table(results).splitlines() == [
        "check     status  seconds  detail",
        "--------  ------  -------  ------",
        "train     PASS        1.2  losses [1.0]",
        "two       SKIP        1.2  needs 2 GPUs",
        "fp16      FAIL        1.2  see below",
        "evaluate  FAIL        1.2  see below",
        "",
        "--- fp16 failed:",
        "exit code 1: train.py",
        "Traceback ...",
        "",
        "--- evaluate failed:",
        "KeyError: 'results'"]


def test_without_a_gpu_it_refuses_unless_allowed(gpu_check, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpu_check.run_cli(lambda: gpu_check.main([])) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device found; ")
    assert gpu_check.run_cli(lambda: gpu_check.main(["--allow-cpu", "--data-root", str(REPO / "no-such-root")])) == 2
    assert capsys.readouterr().err == (f"error: Flowers-102 not found under {REPO / 'no-such-root'}; "
                                       "run: python scripts/prepare_flowers102.py\n")


def test_without_a_root_it_looks_where_make_main_looks(gpu_check, monkeypatch, tmp_path):
    """No --data-root: $DATA_ROOT, then the shared copy, ./data, ./datasets (data.roots), not ./data alone."""
    import torch

    from msretrieval.data import roots

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    shared = tmp_path / "shared"
    (shared / "flowers102").mkdir(parents=True)
    monkeypatch.setattr(roots, "SEARCH_ROOTS", (tmp_path / "none", shared))
    seen = {}

    class Stop(Exception):
        pass

    def record(tmp, data_root, gpus, steps):
        seen["root"] = data_root
        raise Stop

    (shared / "flowers102" / "labels.csv").write_text("")
    monkeypatch.setattr(gpu_check, "GpuCheck", record)
    with pytest.raises(Stop):
        gpu_check.main(["--allow-cpu"])
    assert seen["root"] == shared.resolve()
