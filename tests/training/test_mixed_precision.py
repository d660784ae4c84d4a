"""``train.mixed_precision: bf16`` runs every forward of a step under autocast (bf16 autocast works on the CPU):
the gradient pass (one pass, or gradient caching's pass without gradient and its chunks with it) and the mining
rounds' embedding, while NetVLAD still aggregates in float32."""
from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import nn

import train
from msretrieval.models.netvlad import NetVLAD
from msretrieval.training.trainer import Trainer
from tests.training.synthetic import write_config, write_set

#: a forward of the backbone by (training mode, gradient enabled)
KINDS = {(False, False): "mining", (True, True): "with gradient", (True, False): "caching pass, no gradient"}


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one state per process whose mixed precision cannot change once set: this test starts
    from none and leaves none for the next."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("forward_chunk", [None, 2], ids=["one-pass", "gradient-caching"])
def test_bf16_runs_every_forward_of_a_step_under_the_trainers_autocast(tmp_path, monkeypatch, forward_chunk,
                                                                       fresh_accelerator_state, one_thread):
    """Two Algorithm-1 steps of train.py. accelerate also wraps the prepared model's forward in the same autocast,
    which would hide a forward the trainer runs outside its own ``accelerator.autocast()``; the wrapper is taken
    off, so each forward must get autocast from the trainer."""
    manifest = write_set(tmp_path / "data", per_class=4)[0]
    backbone, aggregation = [], []  # (kind of forward, output dtype) of the first convolution; NetVLAD's dtypes
    setup = Trainer.setup

    def setup_then_record(self, resume_from=None):
        setup(self, resume_from)
        vars(self.model).pop("forward", None)  # accelerate's autocast wrapper: the class's forward again
        first_conv = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        first_conv.register_forward_hook(
            lambda module, args, out: backbone.append((KINDS[module.training, torch.is_grad_enabled()], out.dtype)))
        for vlad in (m for m in self.model.modules() if isinstance(m, NetVLAD)):
            vlad.assign.register_forward_hook(lambda module, args, out: aggregation.append(out.dtype))

    monkeypatch.setattr(Trainer, "setup", setup_then_record)
    config = {"run_dir": str(tmp_path / "run"),
              "data": {"train": f"csv:{manifest}", "train_size": 64, "workers": 1, "val_classes": 0},
              "model": {"backbone": "resnet18", "pretrained": False, "init_images": 8, "head": {"num_clusters": 2}},
              "mining": {"miner": "algorithm1", "classes": 3, "per_class": 4},
              "train": {"steps": 2, "triplets_per_step": 2, "checkpoint_every": 2, "mixed_precision": "bf16",
                        "forward_chunk": forward_chunk}}
    assert train.main(["--config", write_config(tmp_path / "c.yaml", config), "--skip-final-eval"]) == 0
    cached = {"caching pass, no gradient"} if forward_chunk else set()
    assert {kind for kind, _ in backbone} == {"mining", "with gradient"} | cached
    assert [kind for kind, dtype in backbone if dtype != torch.bfloat16] == []
    assert aggregation and set(aggregation) == {torch.float32}  # NetVLAD's matmuls, under autocast too
