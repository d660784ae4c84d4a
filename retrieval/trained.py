"""Trained networks as harness methods: ``run:RUN_DIR`` (best or last checkpoint) or ``model:FILE``.

The checkpoint describes itself (architecture, backbone, head, preprocessing), so evaluation needs none of
the training flags. A hashing network (``model.head.hash_bits``) stores packed codes and is ranked by
Hamming distance. ``itq@BITS:run:RUN_DIR`` binarises a float network's descriptors with ITQ (Gong & Lazebnik)
learned on the benchmark's training images: the unsupervised baseline a learned hash head must beat.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from models.backbones import Preprocessing
from models.retrieval_net import RetrievalNet, load_model
from release.format import sha256_file

from .binary import HammingScores, pack_bits
from .methods import RetrievalMethod
from .scores import ScoreSource

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
    """A frozen :class:`RetrievalNet` from a checkpoint (packed codes and Hamming ranking if it hashes)."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None = None):
        super().__init__(name)
        self.model = model.eval()
        self.checkpoint = checkpoint
        self._fingerprint = file_fingerprint(checkpoint) if checkpoint is not None else None
        self.bits = model.hash_bits
        self.descriptor_kind = "float32" if self.bits is None else "binary"

    @classmethod
    def from_spec(cls, spec: str) -> "TrainedModelMethod":
        """``run:DIR`` / ``model:FILE``, or ``itq@BITS:run:DIR`` / ``itq@BITS:model:FILE``."""
        itq = re.fullmatch(r"itq@(\d+):(.+)", spec)
        path = resolve_checkpoint(itq.group(2) if itq else spec)
        if itq:
            return ITQTrainedMethod(load_model(path), name=spec, checkpoint=path, bits=int(itq.group(1)))
        return cls(load_model(path), name=spec, checkpoint=path)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def config(self) -> dict:
        return {"name": self.name, "model": self.model.config(), "checkpoint": str(self.checkpoint),
                "fingerprint": self._fingerprint}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return self.model(images)
        return torch.from_numpy(pack_bits(self.model.codes(images).cpu().numpy()))

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        if self.bits is None:
            return super().scores(queries, database)
        return HammingScores(queries, database)


class ITQTrainedMethod(TrainedModelMethod):
    """A float network's descriptors -> ITQ codes of ``bits`` bits (PCA to ``bits`` + learned rotation, 50
    iterations), fitted on the benchmark's training images; Hamming ranking."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None, bits: int):
        if model.hash_bits is not None:
            raise ValueError(f"{name}: ITQ binarises float descriptors; this network already hashes")
        if bits < 8 or bits % 8 or bits > model.out_dim:
            raise ValueError(f"{name}: ITQ bits must be a multiple of 8 in [8, {model.out_dim}], got {bits}")
        super().__init__(model, name, checkpoint)
        self.bits, self.descriptor_kind, self.itq = bits, "binary", None

    def config(self) -> dict:
        return {**super().config(), "itq_bits": self.bits}

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        from baselines.msbd.binary import learn_itq  # the MSBD baseline's ITQ (Gong & Lazebnik, 2011)

        from .extract import extract

        device = next(self.model.parameters()).device
        floats = extract(TrainedModelMethod(self.model, f"{self.name} (float)"), train_images, batch_size=16,
                         device=str(device), description="ITQ training descriptors").descriptors
        self.itq = learn_itq(floats, self.bits)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.itq is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() on training images first")
        return torch.from_numpy(pack_bits(self.itq.encode(self.model(images).float().cpu().numpy())))
