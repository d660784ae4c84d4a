"""Trained networks as harness methods: ``run:RUN_DIR`` (best or last checkpoint) or ``model:FILE``.

The checkpoint describes itself (architecture, backbone, head, preprocessing), so evaluation needs none of
the training flags.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.backbones import Preprocessing
from models.retrieval_net import RetrievalNet, load_model
from release.format import sha256_file

from .methods import RetrievalMethod

CHECKPOINT_NAMES = ("best.pth", "last.pth")


def resolve_checkpoint(spec: str) -> Path:
    """``run:DIR`` -> DIR/best.pth, else DIR/last.pth; ``model:FILE`` -> FILE."""
    kind, _, target = spec.partition(":")
    path = Path(target)
    if kind == "model":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return path
    if kind != "run":
        raise ValueError(f"not a trained-model spec: {spec!r} (use run:RUN_DIR or model:FILE)")
    for name in CHECKPOINT_NAMES:
        for candidate in (path / name, path / "checkpoints" / name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {' or '.join(CHECKPOINT_NAMES)} in run directory {path}")


def file_fingerprint(path: Path) -> str:
    """Content hash of a checkpoint (keys the descriptor cache, so retraining invalidates it)."""
    return sha256_file(path)[:16]


class TrainedModelMethod(RetrievalMethod):
    """A frozen :class:`RetrievalNet` from a checkpoint."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None = None):
        super().__init__(name)
        self.model = model.eval()
        self.checkpoint = checkpoint
        self._fingerprint = file_fingerprint(checkpoint) if checkpoint is not None else None

    @classmethod
    def from_spec(cls, spec: str) -> "TrainedModelMethod":
        path = resolve_checkpoint(spec)
        return cls(load_model(path), name=spec, checkpoint=path)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def config(self) -> dict:
        return {"name": self.name, "model": self.model.config(), "checkpoint": str(self.checkpoint),
                "fingerprint": self._fingerprint}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
