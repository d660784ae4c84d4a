"""Distributed training on this CPU (gloo): the gathered embeddings and gradients, and whole runs of train.py
under `accelerate launch` with 2 processes against one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import REPO
from msretrieval.training.distributed import gather_rows, gather_with_grad, shard_sizes, shard_slice


def test_shards_cover_the_batch_in_order():
    assert shard_sizes(7, 3) == [3, 2, 2] and shard_sizes(2, 3) == [1, 1, 0]
    assert [shard_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def _gather_case(rank: int, world: int):
    torch.manual_seed(0)
    weight = torch.randn(3, 2)                      # the "model", the same on every process
    inputs = torch.randn(5, 3)                      # the global batch
    local_inputs = inputs[shard_slice(5, rank, world)]
    w = weight.clone().requires_grad_()
    gathered = gather_with_grad(local_inputs @ w, 5)
    loss = (gathered.sin() * torch.arange(5.0)[:, None]).sum()  # any loss of the whole batch
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world                                   # what DDP does with the parameter gradients
    return gathered.detach(), grad, gather_rows(local_inputs, 5)


def _broadcast_case(rank: int, world: int):
    from msretrieval.training.distributed import broadcast_from_main

    # each process "mined" something else (as devices rounding differently could make them do)
    mined = tuple(torch.arange(rank, rank + 3 + rank) for _ in range(3))
    empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(4))
    return broadcast_from_main(mined), broadcast_from_main(empty)


def _worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results[("gather", rank)] = _gather_case(rank, world)
    results[("broadcast", rank)] = _broadcast_case(rank, world)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """{(case, rank): what _worker's process ``rank`` returned} - one 2-process gloo group for the cases below
    (each spawned process starts an interpreter: seconds)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path_factory.mktemp("gloo") / "init"), results), nprocs=2)
    return dict(results)


def test_gather_with_grad_gives_the_single_process_gradient_after_ddp_averaging(two_processes):
    torch.manual_seed(0)
    weight, inputs = torch.randn(3, 2), torch.randn(5, 3)
    w = weight.clone().requires_grad_()
    expected = inputs @ w
    (expected.sin() * torch.arange(5.0)[:, None]).sum().backward()
    for rank in range(2):
        gathered, grad, rows = two_processes[("gather", rank)]
        assert torch.allclose(gathered, expected.detach()) and torch.equal(rows, inputs)
        assert torch.allclose(grad, w.grad, atol=1e-6)


def _losses(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("miner", ["batch", "algorithm1"])
def test_two_processes_train_exactly_like_one(tmp_path, flowers_root, miner, one_thread):
    """configs/smoke.yaml: global batch 12 (4 classes x 3 / 4 triplets), 2 processes x 6 images. One process
    with the same thread count (accelerate launch gives each process one; the one-process run is train.main in
    this process, on one thread) and the config's forward passes of 6 images does the same arithmetic, so the
    per-step losses agree exactly."""
    common = ["--config", str(REPO / "configs" / "smoke.yaml"), "--skip-final-eval", "--data-root",
              str(flowers_root), "train.steps=4", f"mining.miner={miner}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run([*launch, "train.py", *common, "--run-dir", str(tmp_path / "two")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import train  # here, not at the top: mp.spawn's processes import this module

    assert train.main([*common, "--run-dir", str(tmp_path / "one")]) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4 and any(value > 0 for value in one)
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5


def test_every_process_trains_on_the_triplets_of_process_0(two_processes):
    for rank in (0, 1):
        triplets, empty = two_processes[("broadcast", rank)]
        assert [t.tolist() for t in triplets] == [[0, 1, 2]] * 3
        assert [len(t) for t in empty] == [0] * 4
