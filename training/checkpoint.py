"""Full training state for exact resumption: model, optimiser, scheduler, miner/pool, RNGs and the step.

Crash safety. Every checkpoint is written atomically (:func:`atomic_write`): the bytes go to a temporary file
in the same folder, are flushed and fsynced, the temporary is renamed over the target (``os.replace``) and the
folder is fsynced, so a run killed while saving (or a full disk) leaves the previous file untouched. The
periodic checkpoints of a run are ``step-NNNNNNNN.pth``; the newest ``train.keep_checkpoints`` of them are
kept and ``last.pth`` names the newest (a hard link, replaced atomically; a copy on file systems without
hard links). ``best.pth`` (validation) is separate and never pruned. :func:`load_resumable` picks the newest
checkpoint of a run directory that loads, skipping (with a warning) a truncated or corrupt one.

The model part uses the self-describing format of ``models.retrieval_net`` so that ``last.pth`` /
``best.pth`` load with ``load_model`` and evaluate without training code. Everything in a checkpoint is
tensors and plain Python values, so it loads with ``torch.load(weights_only=True)`` (no unpickling of
arbitrary objects); a file that is a well-formed archive but holds other objects is refused, not skipped.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from msretrieval.models.retrieval_net import CHECKPOINT_FORMAT, RetrievalNet, UnsafeCheckpointError, read_checkpoint
from msretrieval.utils.errors import UserError, first_line
from msretrieval.utils.files import atomic_write, fsync_directory, temporary_name

log = logging.getLogger(__name__)

LAST = "last.pth"
BEST = "best.pth"
_STEP_FILE = re.compile(r"^step-(\d+)\.pth$")


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
    payload = {"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(),
               "metrics": metrics or {}}
    if training_state is not None:
        payload["training_state"] = training_state
    atomic_write(path, lambda handle: torch.save(payload, handle))


# -- the periodic checkpoints of a run ---------------------------------------------------------------------------
def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:08d}.pth"


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's ``step-N.pth`` files, newest first."""
    found = [(int(match.group(1)), path) for path in Path(run_dir).glob("step-*.pth")
             if (match := _STEP_FILE.match(path.name))]
    return sorted(found, reverse=True)


def _point_last_at(target: Path) -> None:
    """``last.pth`` becomes ``target``: a hard link renamed over it (atomic), else an atomic copy."""
    last = target.with_name(LAST)
    temporary = temporary_name(last)
    temporary.unlink(missing_ok=True)
    try:
        os.link(target, temporary)
    except OSError:  # no hard links on this file system
        with target.open("rb") as source:
            atomic_write(last, lambda handle: shutil.copyfileobj(source, handle))
        return
    os.replace(temporary, last)
    fsync_directory(last.parent)


def prune_checkpoints(run_dir: str | Path, keep: int, step: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints up to ``step``, and any of a later step (left over
    from before the run was resumed at an earlier one). Returns the deleted files."""
    removed = []
    kept = 0
    for saved_step, path in step_checkpoints(run_dir):
        if saved_step > step:
            log.info("removing %s: later than this run's step %d (left over from before the resume)", path.name,
                     step)
        elif kept < keep:
            kept += 1
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        fsync_directory(run_dir)
    return removed


def save_step_checkpoint(run_dir: str | Path, step: int, model: RetrievalNet, training_state: dict,
                         keep: int) -> Path:
    """``step-N.pth`` (atomic), then ``last.pth`` -> it, then keep-last-``keep``. A crash at any point leaves
    ``last.pth`` naming a complete checkpoint (the previous one until the switch)."""
    target = step_checkpoint(run_dir, step)
    save_checkpoint(target, model, training_state)
    _point_last_at(target)
    prune_checkpoints(run_dir, keep, step)
    return target


# -- loading -----------------------------------------------------------------------------------------------------
def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(model state_dict, training state) of a checkpoint written by :func:`save_checkpoint`."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT or "training_state" not in checkpoint:
        raise UserError(f"{path} is not a resumable training checkpoint")
    return checkpoint["state_dict"], checkpoint["training_state"]


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, newest first, then ``last.pth`` unless it is one of them (a run written
    before step files existed, or a copy where hard links are unavailable)."""
    run_dir = Path(run_dir)
    candidates = [path for _, path in step_checkpoints(run_dir)]
    last = run_dir / LAST
    if last.is_file() and not any(os.path.samefile(last, path) for path in candidates):
        candidates.append(last)
    return candidates


def load_resumable(path: str | Path) -> tuple[Path, dict, dict]:
    """(checkpoint, model state_dict, training state) to resume from.

    ``path`` a file: that checkpoint (any failure is an error). ``path`` a run directory: the newest of
    :func:`resume_candidates` that loads; a truncated or corrupt one is skipped with a warning. A complete
    archive holding objects other than tensors and plain values is refused (``UnsafeCheckpointError``), not
    skipped: it was not produced by a crash."""
    path = Path(path)
    if path.is_file():
        return (path, *load_training_state(path))
    if not path.is_dir():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    candidates = resume_candidates(path)
    if not candidates:
        raise FileNotFoundError(f"nothing to resume: {path} holds no {LAST} or step-N.pth checkpoint")
    problems = []
    for candidate in candidates:
        try:
            if not zipfile.is_zipfile(candidate):  # torch's format is a zip archive; a truncated one is not
                raise UserError("truncated or not a checkpoint archive")
            return (candidate, *load_training_state(candidate))
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged file can fail in many ways; the next one is tried
            reason = first_line(error)
            problems.append(f"{candidate.name} ({reason})")
            log.warning("cannot resume from %s (%s); trying an older checkpoint", candidate, reason)
    raise UserError(f"nothing to resume in {path}: no checkpoint loads: {'; '.join(problems)}")
