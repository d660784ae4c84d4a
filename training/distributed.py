"""Splitting a global batch across processes and putting it back together.

Every process embeds a contiguous shard of the global batch; the embeddings are gathered in global order, so
every process mines the same triplets and computes the same loss as a single process would on the whole
batch (BatchNorm statistics are frozen, so a sample's embedding does not depend on its batch-mates).

Gradients: :func:`gather_with_grad` all-gathers in the forward pass; in the backward pass each process sums
the gradient of the (identical) loss over all processes and keeps its own rows, i.e. ``world`` times the
true gradient of its rows. DDP then averages the parameter gradients over the processes, which gives
exactly the gradient of the whole-batch loss: 1 and N processes train the same way.

Failures: when one process dies, the others' next collective fails at once (its connection is gone) and
``accelerate launch`` ends the rest; when one stops responding, the others wait in a collective for at most
``train.collective_timeout`` seconds (:func:`process_group_kwargs`). Either way :func:`peer_failures_stop_the_run`
turns the error into one :class:`PeerFailure` line per process instead of a hang or a bare traceback.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from msretrieval.utils.cli import RunStopped
from msretrieval.utils.errors import first_line


def shard_sizes(count: int, world: int) -> list[int]:
    """Rows per process for ``count`` items split contiguously (the first ``count % world`` get one more)."""
    return [count // world + (rank < count % world) for rank in range(world)]


def shard_slice(count: int, rank: int, world: int) -> slice:
    sizes = shard_sizes(count, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    padded = F.pad(local, (0, 0) * (local.dim() - 1) + (0, max(sizes) - len(local))).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.rows = shard_slice(sum(sizes), dist.get_rank(), len(sizes))
        return _all_gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum of every process's gradient of the loss
        return grad[ctx.rows], None


def gather_rows(local: torch.Tensor, count: int) -> torch.Tensor:
    """(shard, ...) on every process -> (count, ...) in global order; no gradient. Device tensors in, device
    tensors out (NCCL gathers only CUDA tensors)."""
    if not _distributed():
        return local
    return _all_gather_rows(local, shard_sizes(count, dist.get_world_size()))


def gather_with_grad(local: torch.Tensor, count: int) -> torch.Tensor:
    """As :func:`gather_rows`, with gradients flowing back to each process's own rows (see the module doc)."""
    if not _distributed():
        return local
    return _GatherWithGrad.apply(local, shard_sizes(count, dist.get_world_size()))


def broadcast_from_main(indices: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Process 0's index tensors (a miner's triplets or pairs) on every process, on each tensor's device.

    Every process mines the same gathered embeddings with the same RNG state, so the results already agree;
    the broadcast makes it a guarantee (GPU kernels of two devices need not round alike, and one differing
    triplet would silently train each process's model replica on another loss). Two small collectives: the
    lengths, then all indices in one tensor."""
    if not _distributed():
        return indices
    device = indices[0].device
    lengths = torch.tensor([len(t) for t in indices], dtype=torch.int64, device=device)
    dist.broadcast(lengths, src=0)
    sizes = lengths.tolist()
    if sum(sizes) == 0:  # nothing mined anywhere: no second collective (every process knows the lengths)
        return tuple(t[:0] for t in indices)
    if dist.get_rank() == 0:
        flat = torch.cat([t.to(device=device, dtype=torch.int64).reshape(-1) for t in indices])
    else:
        flat = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(flat, src=0)
    return tuple(part.to(t.dtype) for part, t in zip(torch.split(flat, sizes), indices))


class PeerFailure(RunStopped):
    """A collective operation failed or timed out: another process died or stopped responding."""


def process_group_kwargs(timeout_seconds: float):
    """accelerate's handler setting how long a collective waits for the other processes before failing."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=float(timeout_seconds)))


def is_collective_failure(error: BaseException) -> bool:
    """A torch.distributed error, or gloo's / NCCL's RuntimeError text for a lost or silent peer."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "nccl", "timed out", "timeout", "pair closure",
                                      "connection closed by peer", "connection reset by peer", "broken pipe",
                                      "watchdog"))


@contextlib.contextmanager
def peer_failures_stop_the_run(rank: int, world: int, timeout_seconds: float, note=lambda: ""):
    """In a run of ``world`` > 1 processes, a failed collective ends this process with a :class:`PeerFailure`
    (a one-line message, exit code 2) naming the likely cause; ``note()`` says what was kept (the checkpoint)."""
    try:
        yield
    except Exception as error:
        if world <= 1 or isinstance(error, RunStopped) or not is_collective_failure(error):
            raise
        kept = note()
        first = first_line(error)
        raise PeerFailure(
            f"process {rank} of {world}: a collective operation failed ({first[:200]}): another process ended or "
            f"stopped responding for more than train.collective_timeout = {timeout_seconds:g} s; its own log says "
            f"why{'; ' + kept if kept else ''}") from error
