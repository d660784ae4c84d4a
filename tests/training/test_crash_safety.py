"""Checkpoints survive kills: atomic writes (a write killed midway never replaces the last good checkpoint),
keep-last-k, --resume taking the newest checkpoint that loads, and SIGTERM / SIGINT stopping after the current
step with a checkpoint from which the run ends exactly as an uninterrupted one."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import train
from tests.conftest import REPO
from tests.training.synthetic import tiny_config, write_config, write_set
from msretrieval.training.checkpoint import load_resumable, prune_checkpoints, save_checkpoint, save_step_checkpoint
from msretrieval.training.trainer import Trainer


class FakeNet:
    """What save_checkpoint needs of a network: its config and its tensors."""

    def __init__(self, value: float, numel: int = 1000):
        self.weights = {"w": torch.full((numel,), value)}

    def config(self) -> dict:
        return {"architecture": "fake"}

    def state_dict(self) -> dict:
        return self.weights


def saved_value(path) -> float:
    return float(torch.load(path, weights_only=True)["state_dict"]["w"][0])


# -- atomic writes -------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, signal, sys, io
    import torch
    from msretrieval.training import checkpoint


    class FakeNet:
        def __init__(self, value, numel=1000):
            self.weights = {"w": torch.full((numel,), value)}

        def config(self):
            return {"architecture": "fake"}

        def state_dict(self):
            return self.weights


    run_dir, mode = sys.argv[1], sys.argv[2]
    checkpoint.save_step_checkpoint(run_dir, 1, FakeNet(1.0), {"step": 1}, keep=2)
    if mode == "partial":   # the next write dies after half of its bytes reached the temporary file
        real_save = torch.save

        def dying_save(payload, handle):
            buffer = io.BytesIO()
            real_save(payload, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.torch.save = dying_save
        checkpoint.save_step_checkpoint(run_dir, 2, FakeNet(2.0), {"step": 2}, keep=2)
    else:                   # write big checkpoints until killed from outside, at whatever point it is
        print("writing", flush=True)
        step = 2
        while True:
            checkpoint.save_step_checkpoint(run_dir, step, FakeNet(float(step), 4_000_000), {"step": step}, keep=2)
            step += 1
""")


def child(run_dir, mode) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), mode], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_a_write_killed_midway_never_replaces_the_last_good_checkpoint(tmp_path):
    process = child(tmp_path, "partial")
    assert process.wait(timeout=60) == -signal.SIGKILL
    partial = tmp_path / "step-00000002.pth.tmp"
    assert partial.is_file() and not (tmp_path / "step-00000002.pth").exists()  # garbage at the temporary name
    assert saved_value(tmp_path / "last.pth") == 1.0
    path, _, state = load_resumable(tmp_path)
    assert path.name == "step-00000001.pth" and state == {"step": 1}
    save_step_checkpoint(tmp_path, 2, FakeNet(2.0), {"step": 2}, keep=2)  # the next write just overwrites it
    assert saved_value(tmp_path / "last.pth") == 2.0 and not partial.exists()


def test_a_writer_killed_at_any_moment_leaves_a_loadable_last_checkpoint(tmp_path):
    process = child(tmp_path, "loop")
    assert process.stdout.readline().strip() == "writing"
    time.sleep(1.5)  # some 32 MB checkpoints in, most likely in the middle of one
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    path, _, state = load_resumable(tmp_path)
    assert path.name == f"step-{state['step']:08d}.pth" and saved_value(tmp_path / "last.pth") >= 1.0
    assert len(list(tmp_path.glob("step-*.pth"))) <= 3  # keep=2, plus at most one written before its pruning


def test_keep_last_k_step_checkpoints_with_last_naming_the_newest(tmp_path):
    save_checkpoint(tmp_path / "best.pth", FakeNet(-1.0), {"step": 0})
    for step in range(1, 6):
        save_step_checkpoint(tmp_path, step, FakeNet(float(step)), {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth", "step-00000004.pth",
                                                         "step-00000005.pth"]  # no temporaries left
    assert os.path.samefile(tmp_path / "last.pth", tmp_path / "step-00000005.pth")
    assert saved_value(tmp_path / "best.pth") == -1.0  # never pruned
    # resumed at step 3 (an explicit older file): later step files are left over and go at the next save
    save_step_checkpoint(tmp_path, 3, FakeNet(3.0), {"step": 3}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pth")) == ["step-00000003.pth"]
    assert prune_checkpoints(tmp_path, keep=1, step=3) == []


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, caplog):
    for step in (1, 2, 3):
        save_step_checkpoint(tmp_path, step, FakeNet(float(step)), {"step": step, "config": {}}, keep=3)
    newest = tmp_path / "step-00000003.pth"
    newest.write_bytes(newest.read_bytes()[:300])  # damaged on disk (last.pth is the same file)
    (tmp_path / "step-00000002.pth").write_bytes(os.urandom(4000))  # and its predecessor overwritten with noise
    with caplog.at_level(logging.WARNING, logger="msretrieval.training.checkpoint"):
        path, _, state = load_resumable(tmp_path)
    assert path.name == "step-00000001.pth" and state["step"] == 1
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot resume from")]
    assert len(warned) == 2 and "step-00000003.pth" in warned[0] and "step-00000002.pth" in warned[1]
    with pytest.raises(RuntimeError):  # a file named explicitly is used as it is, or not at all
        load_resumable(newest)
    (tmp_path / "step-00000001.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"nothing to resume in .*: no checkpoint loads: step-00000003.pth \(trunc"):
        load_resumable(tmp_path)


# -- signals -------------------------------------------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path):
    return write_set(tmp_path / "data")[0]


def test_sigterm_checkpoints_the_step_and_the_resumed_run_ends_with_the_same_weights(
        tmp_path, manifest, monkeypatch, capsys, one_thread):
    straight = tiny_config(tmp_path / "straight", manifest, steps=6)
    assert train.main(["--config", write_config(tmp_path / "a.yaml", straight), "--skip-final-eval"]) == 0
    expected = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["state_dict"]

    original = Trainer.train_step

    def terminated_during_step_three(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the step
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", terminated_during_step_three)
    run = tmp_path / "killed"
    config = tiny_config(run, manifest, steps=6)
    assert train.main(["--config", write_config(tmp_path / "b.yaml", config), "--skip-final-eval"]) == 143
    message = capsys.readouterr().err
    assert f"training interrupted by SIGTERM at step 3/6; checkpoint {run / 'last.pth'}; resume with: python " \
           f"train.py --resume {run}" in message
    assert torch.load(run / "last.pth", weights_only=True)["training_state"]["step"] == 3  # not a multiple of 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train.main(["--resume", str(run), "--skip-final-eval"]) == 0
    resumed = torch.load(run / "last.pth", weights_only=True)
    assert resumed["training_state"]["step"] == 6
    assert resumed["state_dict"].keys() == expected.keys()
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in expected.items())


def test_sigint_to_the_command_exits_130_after_writing_a_checkpoint(tmp_path, manifest):
    run = tmp_path / "run"
    config = tiny_config(run, manifest, steps=500, checkpoint_every=1, log_every=100)
    process = subprocess.Popen([sys.executable, "train.py", "--config", write_config(tmp_path / "c.yaml", config),
                                "--skip-final-eval"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while not (run / "last.pth").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr[-3000:]
    step = torch.load(run / "last.pth", weights_only=True)["training_state"]["step"]
    assert 1 <= step < 500
    assert f"training interrupted by SIGINT at step {step}/500" in stderr and f"--resume {run}" in stderr
