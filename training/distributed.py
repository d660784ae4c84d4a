"""Splitting a global batch across processes and putting it back together.

Every process embeds a contiguous shard of the global batch; the embeddings are gathered in global order, so
every process mines the same triplets and computes the same loss as a single process would on the whole
batch (BatchNorm statistics are frozen, so a sample's embedding does not depend on its batch-mates).

Gradients: :func:`gather_with_grad` all-gathers in the forward pass; in the backward pass each process sums
the gradient of the (identical) loss over all processes and keeps its own rows, i.e. ``world`` times the
true gradient of its rows. DDP then averages the parameter gradients over the processes, which gives
exactly the gradient of the whole-batch loss: 1 and N processes train the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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
