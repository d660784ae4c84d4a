"""Every forward of a training step runs in the mode it needs: the step's gradient passes in train mode with
BatchNorm's statistics frozen, a mining round's embedding (Algorithm 1) in eval mode without gradient, and the
mining round gives the step back the mode it found (issue 24: it left the model in eval mode)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.training.synthetic import run_steps, start_trainer, tiny_config, write_set

ALGORITHM1 = {"miner": "algorithm1", "refresh_every": 1, "classes": 3, "per_class": 2}


def record_modes(model: nn.Module) -> list[tuple[bool, bool, bool]]:
    """(gradient enabled, model.training, any BatchNorm training) at each forward of ``model``."""
    seen = []
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), module.training, any(n.training for n in norms))))
    return seen


@pytest.mark.parametrize("miner", ["batch", "algorithm1"])
@pytest.mark.parametrize("head", ["float", "hash"])
def test_each_forward_of_two_steps_runs_in_its_mode(tmp_path, miner, head, one_thread):
    manifest = write_set(tmp_path / "data", per_class=6)[0]  # 18 images: ITQ to 8 bits needs 16
    config = tiny_config(tmp_path / "run", manifest, steps=2)
    if miner == "algorithm1":
        config["mining"].update(ALGORITHM1)
    if head == "hash":
        config["model"].update(head={"hash_bits": 8}, init_images=16)
    trainer = start_trainer(tmp_path, config)
    seen = record_modes(trainer.unwrapped)
    run_steps(trainer, 2)
    with_gradient = [mode for mode in seen if mode[0]]
    without = [mode for mode in seen if not mode[0]]
    assert with_gradient and all(mode == (True, True, False) for mode in with_gradient), seen
    if miner == "algorithm1":  # one mining round a step, each embedding in eval mode
        assert without and all(mode == (False, False, False) for mode in without), seen
    else:
        assert without == []
