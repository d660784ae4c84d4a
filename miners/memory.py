"""Cross-batch memory (XBM, Wang et al., CVPR 2020): in-batch miners also mine the embeddings of past batches.

Late in training a P x K batch often holds no hard triplet at all (the training classes are separated by
more than the margin inside one batch), so the hard phase of the schedule has nothing to learn from. The
memory keeps the last ``size`` embeddings of the training batches (detached; with their labels and dataset
indices), and the miner takes its positives and negatives from the current batch *and* the memory: many
times more candidates per anchor at the cost of one distance matrix. Anchors are the current batch's, so the
gradient flows through them and through the current batch's own positives and negatives (the batch comes
first in the reference set, with its gradient).

PML's ``CrossBatchMemory`` wraps a loss and mines inside it; this one only holds the reference set, so the
trainer keeps mining once on the main process (broadcast to the others) and drops an anchor's pairs with a
copy of itself, which needs the dataset indices PML's memory does not keep.
"""
from __future__ import annotations

import torch


class EmbeddingMemory:
    """A first-in-first-out queue of the last ``size`` (embedding, label, dataset index) rows."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.size = size
        self.embeddings: torch.Tensor | None = None   # (n <= size, D), oldest first
        self.labels: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.embeddings is None else len(self.embeddings)

    def reference(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The set to mine positives and negatives from: this batch (its rows first, gradient kept), then the
        memory. Returns (embeddings, labels, dataset indices)."""
        if self.embeddings is None:
            return embeddings, labels, indices
        device = embeddings.device
        return (torch.cat([embeddings, self.embeddings.to(device, embeddings.dtype)]),
                torch.cat([labels, self.labels.to(device)]), torch.cat([indices, self.indices.to(device)]))

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Enqueue a batch (after its loss), dropping the oldest rows beyond ``size``."""
        rows = (embeddings.detach(), labels.detach(), indices.detach())
        if self.embeddings is not None:
            rows = tuple(torch.cat([old, new]) for old, new in zip(self.state(), rows))
        self.embeddings, self.labels, self.indices = (t[-self.size:].clone() for t in rows)

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embeddings, self.labels, self.indices

    def state_dict(self) -> dict:
        """On the CPU, so a checkpoint loads on any device."""
        if self.embeddings is None:
            return {"size": self.size}
        return {"size": self.size, **{name: t.cpu() for name, t in zip(("embeddings", "labels", "indices"),
                                                                         self.state())}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["size"] != self.size:
            raise ValueError(f"the checkpoint's memory holds {state['size']} embeddings, this run's {self.size}")
        if "embeddings" in state:
            self.embeddings, self.labels, self.indices = (state[name].to(device)
                                                          for name in ("embeddings", "labels", "indices"))
        else:
            self.embeddings = self.labels = self.indices = None
