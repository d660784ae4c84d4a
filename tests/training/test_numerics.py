"""A NaN / inf loss or gradient skips the optimiser step (parameters and optimiser state untouched), is logged
and counted; train.max_bad_steps of them in a row stop the run, the last checkpoint intact."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from tests.training.synthetic import tiny_config, write_config, write_set
from msretrieval.training.config import resolve_config
from msretrieval.training.trainer import Trainer, TrainingDiverged
from msretrieval.utils.cli import run_cli


@pytest.fixture
def manifest(tmp_path):
    return write_set(tmp_path / "data")[0]


def poison(trainer: Trainer, value: float):
    """The next losses become non-finite: times NaN (so the gradients are NaN too), or plus inf."""
    forward = type(trainer.loss).forward

    def poisoned(*args, **kwargs):
        loss = forward(trainer.loss, *args, **kwargs)
        return loss * value if math.isnan(value) else loss + value

    trainer.loss.forward = poisoned


def cure(trainer: Trainer):
    del trainer.loss.forward


def snapshot(trainer: Trainer) -> tuple[dict, dict]:
    """Parameters and the optimiser's state (Adam's moments and step counts; the learning rate in its
    parameter groups follows the schedule, which advances with the step count, skipped steps included)."""
    return ({k: v.clone() for k, v in trainer.unwrapped.state_dict().items()},
            copy.deepcopy(trainer.optimizer.state_dict()["state"]))


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def trainer(tmp_path, manifest, one_thread):
    config = resolve_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", manifest)))
    trainer = Trainer(config, tmp_path / "run", tmp_path, Accelerator(cpu=True))
    trainer.setup(None)
    trainer.train_step()  # Adam has state to protect
    trainer.step += 1
    yield trainer
    trainer.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_leaves_parameters_and_optimiser_untouched(trainer, caplog, value):
    before = snapshot(trainer)
    poison(trainer, value)
    with caplog.at_level(logging.WARNING, logger="msretrieval.training.trainer"):
        values = trainer.train_step()
    assert not torch.isfinite(torch.tensor(values["train/loss"]))
    after = snapshot(trainer)
    assert same_tensors(before[0], after[0]) and same_tensors(before[1], after[1])
    assert (trainer.skipped_steps, trainer.bad_streak, values["train/skipped_steps"]) == (1, 1, 1)
    assert f"step 2: the loss is {value}; optimiser step skipped (1 in a row, train.max_bad_steps = 5)" in caplog.text
    assert all(p.grad is None for p in trainer.unwrapped.parameters())  # nothing carried into the next step
    cure(trainer)
    trainer.step += 1
    trainer.train_step()
    assert trainer.bad_streak == 0 and trainer.skipped_steps == 1  # a good step ends the run of bad ones
    assert not same_tensors(before[0], snapshot(trainer)[0])


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_too(trainer, caplog):
    before = snapshot(trainer)
    weight = next(p for p in trainer.unwrapped.parameters() if p.requires_grad)
    hook = weight.register_hook(lambda grad: grad * float("nan"))
    with caplog.at_level(logging.WARNING, logger="msretrieval.training.trainer"):
        values = trainer.train_step()
    hook.remove()
    assert torch.isfinite(torch.tensor(values["train/loss"]))
    assert same_tensors(before[0], snapshot(trainer)[0]) and same_tensors(before[1], snapshot(trainer)[1])
    assert trainer.skipped_steps == 1 and "non-finite gradient in 1 parameter tensor(s)" in caplog.text


def run_with_bad_steps(monkeypatch, bad_steps: set[int]):
    """train.main with the loss of steps ``bad_steps`` (1-based) made NaN."""
    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 not in bad_steps:
            return original(self)
        poison(self, float("nan"))
        try:
            return original(self)
        finally:
            cure(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_bad_steps_are_counted_and_the_run_finishes(tmp_path, manifest, monkeypatch, one_thread):
    run_with_bad_steps(monkeypatch, {2, 4})
    config = tiny_config(tmp_path / "run", manifest, steps=5, log_every=5)
    assert train.main(["--config", write_config(tmp_path / "c.yaml", config), "--skip-final-eval"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    skipped = events.Scalars("train/skipped_steps")
    assert skipped[-1].value == 2  # the number injected
    assert [e.step for e in skipped] == [1, 2, 4, 5]  # logged when it changes, whatever log_every says
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["training_state"]["step"] == 5


def test_max_bad_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path, manifest, monkeypatch, capsys,
                                                                         one_thread):
    run_with_bad_steps(monkeypatch, {4, 5, 6, 7})
    config = tiny_config(tmp_path / "run", manifest, steps=8, max_bad_steps=3)  # checkpoints every 2 steps
    path = write_config(tmp_path / "c.yaml", config)
    with pytest.raises(TrainingDiverged) as stopped:
        train.main(["--config", path, "--skip-final-eval"])
    run = tmp_path / "run"
    assert str(stopped.value) == (
        "stopping at step 6: 3 optimiser steps in a row had a non-finite loss or gradient and were skipped "
        f"(train.max_bad_steps = 3); the last checkpoint, {run / 'last.pth'} (step 2), is intact: fix the cause, "
        f"then resume with --resume {run}")
    last = torch.load(run / "last.pth", weights_only=True)  # the step-4 checkpoint waited for a good step
    assert last["training_state"]["step"] == 2 and sorted(p.name for p in run.glob("step-*.pth")) == \
        ["step-00000002.pth"]
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    skipped = EventAccumulator(str(run / "tb")).Reload().Scalars("train/skipped_steps")
    assert skipped[-1].value == 3
    config["run_dir"] = str(tmp_path / "run-cli")  # the command line: one line, exit code 2
    assert run_cli(lambda: train.main(["--config", write_config(tmp_path / "c.yaml", config),
                                       "--skip-final-eval"])) == 2
    assert capsys.readouterr().err.strip().startswith("error: stopping at step 6: 3 optimiser steps in a row")
