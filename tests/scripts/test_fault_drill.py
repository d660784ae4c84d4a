"""scripts/fault_drill.py on a tiny generated set: damaged copies really fail to load and only training-class
images are damaged; a run killed with SIGKILL and resumed ends with the undisturbed run's metrics and counts
exactly the injected unreadable files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.data.manifest import read_csv_manifest
from tests.conftest import REPO, run_script
from tests.training.synthetic import tiny_config, write_config, write_set
from msretrieval.training.config import resolve_config

sys.path.insert(0, str(REPO / "scripts"))
import fault_drill  # noqa: E402


def test_damaged_copies_fail_to_load_and_spare_the_validation_classes(tmp_path, monkeypatch):
    manifest, _ = write_set(tmp_path / "data", num_classes=5, per_class=8)
    config = tiny_config(tmp_path / "run", manifest)
    config["data"]["val_classes"] = 1
    config = resolve_config(write_config(tmp_path / "c.yaml", config))
    monkeypatch.chdir(tmp_path)  # a relative --out
    drill_manifest, damaged = fault_drill.corrupt_manifest(config, tmp_path, Path("drill"), 0.1, seed=0)
    assert len(damaged) == 4 == len(set(damaged))  # 10 % of 40
    drilled = read_csv_manifest(drill_manifest)
    assert all(path.is_file() for path in drilled.paths)  # the damaged copies are where the manifest says
    for path in damaged:
        with pytest.raises(ImageLoadError):
            load_image(path)
    original = read_csv_manifest(manifest)
    assert list(original.labels) == list(drilled.labels)
    changed = [i for i, (a, b) in enumerate(zip(original.paths, drilled.paths)) if a.resolve() != b.resolve()]
    assert sorted(str(drilled.paths[i]) for i in changed) == sorted(damaged)
    from msretrieval.training.data import split_validation_classes
    _, validation = split_validation_classes(original, 1, int(config["seed"]))
    assert not set(original.labels[changed]) & set(validation.labels)
    kinds = {path.split("/")[-1].split("-")[0] for path in damaged}
    assert kinds == {"truncated", "random_bytes", "not_an_image", "empty"}  # the first four of the cycle


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_and_resumed_run_ends_like_the_undisturbed_one(tmp_path, capsys):
    manifest, _ = write_set(tmp_path / "data", num_classes=4, per_class=10)
    settings = tiny_config(tmp_path / "run", manifest, steps=12, checkpoint_every=2)
    # the final evaluation on other images than the training ones (training/config.py refuses shared images)
    settings["eval"]["benchmark"] = f"csv:{write_set(tmp_path / 'test', num_classes=4, per_class=10, seed=1)[0]}"
    config = write_config(tmp_path / "c.yaml", settings)
    out = tmp_path / "drill"
    # the drill itself in-process (its train.py runs are the processes it kills)
    code, stdout, stderr = run_script("fault_drill", ["--config", config, "--out", str(out), "--kills", "2",
                                                      "--corrupt-fraction", "0.1", "--kill-window", "0.3", "0.6"],
                                      capsys)
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    report = json.loads((out / "drill.json").read_text())
    assert report["passed"] and report["injected"] == 4 and len(report["kills"]) == 2
    for run in report["runs"].values():
        assert run["bad_images"] == 4 and run["steps"] == 12
    assert max(report["differences"].values()) <= 0.005
    assert "PASS  final metrics within 0.005" in stdout
