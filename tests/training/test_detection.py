"""The detector's training loop runs through ``accelerate``: the detector, its optimiser and every batch on
``accelerator.device``, the backward pass and gradient clipping through the accelerator (which scales fp16
losses), and the checkpoint it writes loads. On this CPU-only machine the device is the CPU; the checks are
that everything goes through the accelerator and lands where it says, and the options that cannot work here
(fp16 on the CPU, --device cuda without CUDA) fail in one line before anything is written.
``scripts/gpu_check.py`` runs a detector step on CUDA (and in bf16)."""
import json

import pytest
import torch

from msretrieval.models.detector import load_detector, read_detector_checkpoint
from tests.models.test_detector import write_squares
from msretrieval.training.detection import DetectorTrainer, detector_accelerator

TINY = {"steps": 2, "eval_every": 0, "batch_size": 2, "pretrained": False, "min_size": 64, "max_size": 64,
        "val_fraction": 0.0, "lr": 1e-3, "warmup": 0, "device": "cpu"}


def test_a_detector_step_runs_through_the_accelerator(tmp_path, monkeypatch, one_thread):
    boxes = write_squares(tmp_path / "data", 4, size=64)
    trainer = DetectorTrainer.start(tmp_path / "run", {"boxes": str(boxes), **TINY})
    accelerator = trainer.accelerator
    device = accelerator.device
    assert trainer.device == device and accelerator.mixed_precision == "no"
    assert trainer.detector in accelerator._models  # prepared: the accelerator places it (and autocasts it)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    before = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    seen, calls = [], []
    hook = trainer.detector.register_forward_pre_hook(
        lambda _module, args: seen.extend([t.device for t in args[0]] + [v.device for target in args[1]
                                                                          for v in target.values()]))
    for name in ("backward", "clip_grad_norm_"):
        original = getattr(accelerator, name)
        monkeypatch.setattr(accelerator, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    trainer.fit()
    hook.remove()
    assert calls == ["backward", "clip_grad_norm_"] * 2  # both steps, through the accelerator
    assert len(seen) == 2 * (2 + 2 * 2) and set(seen) == {device}  # 2 images + their boxes / labels per step
    assert {p.device for p in trainer.unwrapped.parameters()} == {device}
    changed = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable tensor moved (AdamW's first step moves each weight)
    results = trainer.finish()
    assert results["steps"] == 2 and results["options"]["device"] == "cpu"
    checkpoint = read_detector_checkpoint(tmp_path / "run" / "last.pth")
    assert checkpoint["training_state"]["scaler"] is None and checkpoint["training_state"]["cuda_rng"] is None
    loaded = load_detector(tmp_path / "run" / "last.pth")
    for name, value in trainer.unwrapped.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert len(loaded.propose([torch.rand(3, 64, 64)])[0]) >= 1  # the full image, at least
    assert json.loads((tmp_path / "run" / "options.json").read_text())["mixed_precision"] == "no"


def test_options_that_cannot_run_here_are_one_line_errors(tmp_path, monkeypatch):
    boxes = write_squares(tmp_path / "data", 2, size=32)
    with pytest.raises(ValueError, match="^--mixed-precision fp16 needs a CUDA device; on the CPU use bf16 or no$"):
        DetectorTrainer.start(tmp_path / "fp16", {"boxes": str(boxes), **TINY, "mixed_precision": "fp16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^--device cuda: torch sees no CUDA device"):
        DetectorTrainer.start(tmp_path / "cuda", {"boxes": str(boxes), **TINY, "device": "cuda"})
    with pytest.raises(ValueError, match="--mixed-precision must be one of no, bf16, fp16"):
        detector_accelerator({"device": "auto", "mixed_precision": "fp8"})
    assert not (tmp_path / "fp16").exists() and not (tmp_path / "cuda").exists()  # nothing written
