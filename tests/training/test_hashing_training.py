"""Hash networks in the real training loop (issue 25): CSQ once bits saturate, Algorithm 1 mining on the relaxed
codes the loss sees, every miner on a hash network, and the distillation term's targets. Tiny CPU runs
(ResNet-18 + GeM at 64 px, random weights, :mod:`tests.training.synthetic`)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.training.synthetic import run_steps, start_trainer, tiny_config, write_set


def hash_config(tmp_path, bits: int, per_class: int, **model) -> dict:
    """3 classes x ``per_class`` images; ITQ to ``bits`` bits needs 2 x bits images to start from."""
    manifest = write_set(tmp_path / "data", per_class=per_class)[0]
    config = tiny_config(tmp_path / "run", manifest, steps=2)
    config["model"].update(head={"hash_bits": bits}, init_images=3 * per_class, **model)
    return config


@pytest.mark.parametrize("bits", [24, 96])
def test_csq_trains_on_saturated_codes(tmp_path, bits, one_thread):
    """A saturated bit (tanh = +-1) scaled to the network's output u / sqrt(K) and back is +-1.0000001 in float32
    at 24 and 96 bits; CSQ's [-1, 1] check stopped such runs mid-way."""
    config = hash_config(tmp_path, bits, per_class=2 * bits // 3, hash_beta={"beta0": 1e4})  # beta 1e4: saturated
    config["loss"] = {"name": "csq"}
    trainer = start_trainer(tmp_path, config)
    values = trainer.train_step()
    trainer.close()
    assert math.isfinite(values["train/loss"]) and values["hash/beta"] == 1e4
