"""Under `accelerate launch`, one failing process ends all of them with a clear line instead of a hang: a
process that dies (an exception) and one that stops responding (a collective timeout)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO
from tests.training.synthetic import tiny_config, write_config, write_set
from msretrieval.training.distributed import PeerFailure, is_collective_failure, peer_failures_stop_the_run
from msretrieval.utils.cli import RunStopped

# train.py with process 1's third step replaced by a fault; everything else is the real entry point
FAULTY_TRAIN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import train
    from msretrieval.training.trainer import Trainer
    from msretrieval.utils.cli import run_cli

    real_step = Trainer.train_step

    def faulty_step(self):
        if os.environ["FAULT"] == "hang" and self.step == 2:
            # the start-up collectives are past: shorten the wait under test, having shown the configured one
            import datetime
            import torch.distributed as dist
            group = dist.distributed_c10d._get_default_group()._get_backend(self.accelerator.device)
            print(f"process {{self.accelerator.process_index}}: collective timeout "
                  f"{{group.options._timeout.total_seconds():g}} s", flush=True)
            dist.set_timeout(datetime.timedelta(seconds=float(os.environ["SHORT_TIMEOUT"])))
        if self.accelerator.process_index == 1 and self.step == 2:
            if os.environ["FAULT"] == "raise":
                raise RuntimeError("injected failure on process 1")
            # stops responding; the launcher's SIGTERM ends it (the trainer's handler would wait for the step to
            # finish, and the launcher only sends SIGKILL 30 s later: the same end, 30 s later)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        return real_step(self)

    Trainer.train_step = faulty_step
    sys.exit(run_cli(train.main))
""")


def test_only_collective_failures_become_peer_failures():
    def raising(error):
        with peer_failures_stop_the_run(rank=0, world=2, timeout_seconds=5, note=lambda: "kept"):
            raise error

    with pytest.raises(PeerFailure, match=r"process 0 of 2: .*Timed out.*collective_timeout = 5 s.*; kept"):
        raising(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv"))
    with pytest.raises(ZeroDivisionError):  # a bug in this process keeps its traceback
        raising(ZeroDivisionError("division by zero"))
    with pytest.raises(RuntimeError, match="gloo"):  # one process: nothing to blame on others
        with peer_failures_stop_the_run(rank=0, world=1, timeout_seconds=5):
            raise RuntimeError("gloo: Connection closed by peer")
    assert issubclass(PeerFailure, RunStopped)
    assert is_collective_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    # what DDP's buffer broadcast raises when gloo's timeout closes the connection (seen under load)
    assert is_collective_failure(RuntimeError("Application timeout caused pair closure"))
    assert not is_collective_failure(RuntimeError("CUDA out of memory"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_one_failing_process_ends_the_launch(tmp_path, fault):
    manifest, _ = write_set(tmp_path / "data", num_classes=4, per_class=4)
    # long enough that a loaded machine's start-up waits (model build, head set-up) never reach it; the hanging
    # run shortens it to SHORT_TIMEOUT once training steps (so the test does not wait out the 30 s)
    config = tiny_config(tmp_path / "run", manifest, steps=6, collective_timeout=30)
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN.format(repo=str(REPO)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": fault, "SHORT_TIMEOUT": "3"}
    started = time.monotonic()
    done = subprocess.run([*launch, str(script), "--config", write_config(tmp_path / "c.yaml", config),
                           "--skip-final-eval"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    if fault == "raise":  # the dying process says why; the survivor's collective fails at once
        assert "injected failure on process 1" in output
    else:  # the waiting process gives up after train.collective_timeout and says so
        assert "process 0 of 2: a collective operation failed" in output, output[-3000:]
        assert "train.collective_timeout = 30 s" in output
        # the config's timeout is the process group's (until the test shortened it)
        assert "process 0: collective timeout 30 s" in output and "process 1: collective timeout 30 s" in output
    assert elapsed < 900, f"took {elapsed:.0f} s"  # not the hour-long sleep, not a hang
