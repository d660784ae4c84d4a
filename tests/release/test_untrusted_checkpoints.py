"""A checkpoint that runs code when unpickled is refused by every entry point that loads one, and the code
never runs (the payload would create a marker file)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import train
from msretrieval.models.backbones import WeightsError, create_backbone
from msretrieval.models.retrieval_net import CHECKPOINT_FORMAT, UnsafeCheckpointError, load_model
from msretrieval.release import load_release
from msretrieval.release.load import describe_release
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod
from msretrieval.training.checkpoint import load_training_state
from msretrieval.training.config import DEFAULT_CONFIG
from tests.conftest import run_script

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this calls exec(), which writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "state_dict": {"w": torch.zeros(1)},
                "training_state": {"step": 1}, "payload": Payload(marker)}, path)
    return path


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """The test below means something only if this file really runs code under a plain unpickler."""
    marker = tmp_path / "ran"
    torch.load(malicious_checkpoint(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_every_loading_entry_point_refuses_it(tmp_path, make_labelled_set, capsys):
    marker = tmp_path / "ran"
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(evil, run_dir / "last.pth")
    shutil.copy(evil, run_dir / "best.pth")
    shutil.copy(DEFAULT_CONFIG, run_dir / "config.yaml")
    refused = [
        ("load_model", lambda: load_model(evil)),
        ("load_training_state", lambda: load_training_state(evil)),
        ("load_release", lambda: load_release(evil)),
        ("describe_release (train.py --init-from)", lambda: describe_release(evil)),
        ("evaluation method model:FILE", lambda: TrainedModelMethod.from_spec(f"model:{evil}")),
        ("evaluation method run:DIR", lambda: TrainedModelMethod.from_spec(f"run:{run_dir}")),
        ("train.py --resume", lambda: train.main(["--resume", str(run_dir)])),
        ("train.py --init-from", lambda: train.main(["--init-from", str(evil), "--run-dir", str(tmp_path / "new")])),
        ("torch.hub retriever", lambda: torch.hub.load(str(REPO), "retriever", source="local", release=str(evil))),
    ]
    for name, load in refused:
        with pytest.raises(UnsafeCheckpointError, match="refusing .*evil.pth|refusing .*last.pth|refusing .*best.pth"):
            load()
        assert not marker.exists(), f"{name} ran the payload"
    with pytest.raises(WeightsError, match="evil.pth"):  # backbone weights (model.weights)
        create_backbone("resnet18", weights=evil)
    manifest = make_labelled_set()  # the command lines report it in one line, exit code 2 (main(argv) in-process)
    for script, arguments in (("evaluate", ["--benchmark", f"csv:{manifest}", "--method", f"model:{evil}",
                                            "--cache-dir", ""]),
                              ("export", [str(run_dir), str(tmp_path / "release")])):
        code, _, stderr = run_script(script, arguments, capsys)
        assert code == 2 and "error: refusing" in stderr, (script, stderr[-2000:])
    assert not marker.exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_from"] is None
