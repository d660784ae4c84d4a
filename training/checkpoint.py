"""Full training state for exact resumption: model, optimiser, scheduler, miner/pool, RNGs and the step.

``last.pth`` is written atomically (temporary file + rename), so a run killed while saving still has its
previous checkpoint. The model part uses the self-describing format of ``models.retrieval_net`` so that
``last.pth`` / ``best.pth`` load with ``load_model`` and evaluate without training code. Everything in a
checkpoint is tensors and plain Python values, so it loads with ``torch.load(weights_only=True)`` (no
unpickling of arbitrary objects).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from models.retrieval_net import CHECKPOINT_FORMAT, RetrievalNet, read_checkpoint


def rng_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: str | Path, model: RetrievalNet, training_state: dict | None = None,
                    metrics: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(),
               "metrics": metrics or {}}
    if training_state is not None:
        payload["training_state"] = training_state
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(temporary, path)


def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(model state_dict, training state) of a checkpoint written by :func:`save_checkpoint`."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT or "training_state" not in checkpoint:
        raise ValueError(f"{path} is not a resumable training checkpoint")
    return checkpoint["state_dict"], checkpoint["training_state"]
