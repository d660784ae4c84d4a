"""Training images: which set, the validation classes held out of it, and loading batches of them.

Every image of a batch is augmented with its own seed, derived from (run seed, step, position), so the
batches of a resumed run are exactly those of an uninterrupted run, however many threads or processes load
them.

Unreadable training images (corrupt, truncated, not an image, missing) do not stop training: the file is
recorded (and logged once), and a readable image of the same class takes its place in the batch, so a P x K
batch keeps its shape and its labels. The stand-in is a pure function of the position's seed and the set of
readable files (see :meth:`ImageBatches.load`), so resumed and distributed runs draw the same one. How many
unreadable files a run tolerates is the trainer's decision (``data.max_bad_fraction``). Evaluation does not
use this class: there an unreadable image is an error (``data.images.ImageLoadError``).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.data.image_sets import load_image_set
from msretrieval.data.manifest import LabelledImageSet
from msretrieval.data.samplers import class_members
from msretrieval.data.train_transforms import TrainTransform
from msretrieval.data.transforms import EvalTransform
from msretrieval.utils.cli import RunStopped
from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)


class BadTrainingData(RunStopped):
    """Too many unreadable training images, or a class with no readable image left."""


def load_training_set(spec: str, data_root: str | Path) -> LabelledImageSet:
    """``flowers102[:SPLIT]`` | ``csv:PATH[:SPLIT]`` | ``gldv2:PATH`` (train.csv or train_clean.csv)
    (:func:`data.image_sets.load_image_set`). A manifest without ``:SPLIT`` trains on every row: one INFO
    line says how many rows of which split values, and a warning is logged when some are ``test`` rows."""
    images = load_image_set(spec, data_root, kinds=("flowers102", "csv", "gldv2"))
    kind, _, rest = spec.partition(":")
    if kind == "csv" and not rest.partition(":")[2]:
        _log_every_row(images, rest)
    return images


def _log_every_row(images: LabelledImageSet, manifest: str) -> None:
    """``csv:PATH`` without a split: which rows the run trains on (all of them)."""
    splits = images.extra.get("split")
    if splits is None:
        log.info("training on all %d rows of %s (no split column)", len(images), manifest)
        return
    values, counts = np.unique(np.asarray(splits, dtype=str), return_counts=True)
    by_value = ", ".join(f"{count} {value or '(empty)'}" for value, count in zip(values, counts))
    log.info("training on all %d rows of %s, every split value: %s (csv:PATH:SPLIT keeps one)", len(images),
             manifest, by_value)
    if "test" in values.tolist():
        log.warning("the training set csv:%s includes its %d 'test' rows: use csv:%s:train to train on the train "
                    "rows only", manifest, int(counts[values.tolist().index("test")]), manifest)


def split_validation_classes(images: LabelledImageSet, count: int, seed: int
                             ) -> tuple[LabelledImageSet, LabelledImageSet | None]:
    """(training part, validation part): ``count`` whole classes drawn with ``seed`` are held out, so
    validation is class-disjoint like the test protocol. ``count`` 0: no validation set."""
    if count == 0:
        return images, None
    classes = np.unique(images.labels)
    if not 0 < count <= len(classes) - 2:
        raise UserError(f"data.val_classes = {count}: {images.name} has {len(classes)} classes; hold out "
                         f"between 1 and {len(classes) - 2} of them, or 0 for no validation")
    held_out = np.random.default_rng(seed).choice(classes, size=count, replace=False)
    is_val = np.isin(images.labels, held_out)
    return (images.subset(np.flatnonzero(~is_val), name=f"{images.name}-fit"),
            images.subset(np.flatnonzero(is_val), name=f"{images.name}-val"))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class CentreSquare:
    """Shorter side -> ``size`` (bilinear), centre square crop: the unaugmented view (mining, head set-up)."""

    def __init__(self, size: int):
        self.resize = EvalTransform(size, "shorter", min_side=size)
        self.size = size

    def __call__(self, image):
        width, height = self.resize.output_size(*image.size)
        image = image.resize((width, height), Image.BILINEAR) if (width, height) != image.size else image
        return TF.center_crop(image, [self.size, self.size])


class ImageBatches:
    """Loads images of a training set as normalised (B, 3, size, size) float tensors on ``device`` in
    channels-last layout: augmented (:class:`TrainTransform`, one seed per image) or plain
    (:class:`CentreSquare`).

    Decoding and PIL cropping run on ``workers`` threads; the conversion to a normalised tensor is one
    batched operation in the calling thread (torch operations on helper threads start OpenMP teams whose
    spinning threads slow the network down), done after the uint8 batch is on the device (4x less to copy).
    ``keep_decoded`` keeps every decoded image in memory after its first use (a few hundred MB for
    Flowers-102's training split; JPEG decoding is then paid once instead of at every step). Leave it off
    for large sets (GLDv2).

    Unreadable files: ``bad`` maps the dataset index of every file that failed to load to the reason, in the
    order found (``new_bad``: those not yet collected by the trainer); see :meth:`load`."""

    def __init__(self, images: LabelledImageSet, size: int, mean, std, device: torch.device, workers: int = 2,
                 scale: Sequence[float] = (0.5, 1.0), keep_decoded: bool = False, seed: int = 0):
        self.images = images
        self.device = device
        self.size = size
        self.seed = int(seed)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.augment = TrainTransform(size, mean=mean, std=std, scale=tuple(scale))
        self.plain = CentreSquare(size)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.decoded: dict[int, Image.Image] | None = {} if keep_decoded else None
        self.members = class_members(images.labels)
        self.bad: dict[int, str] = {}
        self.new_bad: list[int] = []
        #: dataset indices of the images the last :meth:`load` returned (stand-ins included)
        self.last_indices: list[int] = []

    def _decode(self, index: int) -> Image.Image:
        if self.decoded is None:
            return load_image(self.images.paths[index])
        if index not in self.decoded:
            self.decoded[index] = load_image(self.images.paths[index])
        return self.decoded[index]

    def _one(self, index: int, seed: int | None) -> np.ndarray:
        image = self._decode(index)
        view = self.plain(image) if seed is None else self.augment.augment(image, torch.Generator().manual_seed(seed))
        return np.asarray(view, dtype=np.uint8)

    def _try(self, index: int, seed: int | None) -> np.ndarray | ImageLoadError:
        try:
            return self._one(index, seed)
        except ImageLoadError as error:
            return error

    # -- unreadable files ------------------------------------------------------------------------------------------
    def mark_bad(self, index: int, reason: str | ImageLoadError, found_here: bool = True) -> bool:
        """Record an unreadable file (once); ``found_here`` False: found by another process (not logged, not
        in ``new_bad``). True if it is new."""
        index = int(index)
        if index in self.bad:
            return False
        if isinstance(reason, ImageLoadError):
            reason = reason.reason or str(reason)
        self.bad[index] = str(reason)
        if self.decoded is not None:
            self.decoded.pop(index, None)
        if found_here:
            self.new_bad.append(index)
            log.warning("unreadable training image skipped: %s (%s); an image of the same class takes its place "
                        "(%d unreadable so far)", self.images.paths[index], reason, len(self.bad))
        return True

    def bad_paths(self) -> list[str]:
        return [str(self.images.paths[index]) for index in self.bad]

    def _stand_in(self, index: int, seed: int | None, exclude: set[int]) -> tuple[np.ndarray, int]:
        """A readable image of ``index``'s class, loaded with ``seed``: the first readable one in a random
        order of the class drawn from ``seed`` (plain loads: from the run seed and ``index``), members of the
        batch (``exclude``) last. Known-unreadable files are passed over without another read, so the choice
        does not depend on when (or by which process) a file was found unreadable."""
        label = self.images.labels[index]
        members = self.members[int(label)]
        key = seed if seed is not None else derived_seed(self.seed, 0xBAD, index)
        order = np.random.default_rng(key).permutation(members).tolist()
        for candidate in [m for m in order if m not in exclude] + [m for m in order if m in exclude]:
            if candidate in self.bad:
                continue
            result = self._try(candidate, seed)
            if not isinstance(result, ImageLoadError):
                return result, candidate
            self.mark_bad(candidate, result)
        shown = ", ".join(str(self.images.paths[m]) for m in members[:3])
        raise BadTrainingData(f"training class {label} has no readable image left: all {len(members)} of its "
                              f"files are unreadable ({shown}{', ...' if len(members) > 3 else ''})")

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self, indices: Sequence[int], seeds: Sequence[int] | None = None,
             batch: Sequence[int] | None = None) -> torch.Tensor:
        """Augmented with per-image ``seeds``, or plain when ``seeds`` is None.

        An unreadable image is recorded in ``bad`` and replaced by a stand-in of its class
        (:meth:`_stand_in`) loaded with the same seed; ``batch`` (default ``indices``) is the whole global
        batch whose members a stand-in avoids when the class has others. The returned tensor always holds
        ``len(indices)`` images; ``last_indices`` says which."""
        indices = [int(i) for i in indices]
        seeds = list(seeds) if seeds is not None else [None] * len(indices)
        if len(seeds) != len(indices):
            raise ValueError(f"{len(indices)} images but {len(seeds)} seeds")
        arrays: list[np.ndarray | None] = [None] * len(indices)
        chosen = list(indices)
        todo = [p for p, index in enumerate(indices) if index not in self.bad]
        for p, result in zip(todo, self.pool.map(self._try, [indices[p] for p in todo], [seeds[p] for p in todo])):
            if isinstance(result, ImageLoadError):
                self.mark_bad(indices[p], result)
            else:
                arrays[p] = result
        if any(array is None for array in arrays):
            exclude = {int(i) for i in (indices if batch is None else batch)}
            for p, array in enumerate(arrays):
                if array is None:
                    arrays[p], chosen[p] = self._stand_in(indices[p], seeds[p], exclude)
        self.last_indices = chosen
        pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, self.size, self.size, 3,
                                                                              dtype=torch.uint8)
        # (B, H, W, 3) uint8 -> (B, 3, H, W) view, which is channels-last; the same arithmetic as
        # torchvision's to_tensor + normalize
        batch_tensor = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div(255)
        return batch_tensor.sub(self.mean).div(self.std).contiguous(memory_format=torch.channels_last)

    def scan(self, indices: Sequence[int], desc: str = "checking training images") -> int:
        """Read each of ``indices`` once (decoded images are kept when ``keep_decoded``); unreadable ones are
        recorded as in :meth:`load`. Returns how many new unreadable files were found."""
        from tqdm.auto import tqdm

        before = len(self.bad)
        todo = [int(i) for i in indices if int(i) not in self.bad]
        checks = self.pool.map(lambda index: (index, self._check(index)), todo)
        for index, error in tqdm(checks, total=len(todo), desc=desc, unit="img", leave=False, disable=None):
            if error is not None:
                self.mark_bad(index, error)
        return len(self.bad) - before

    def _check(self, index: int) -> ImageLoadError | None:
        try:
            image = self._decode(index)
            if self.decoded is None:
                image.close()
            return None
        except ImageLoadError as error:
            return error

    def decode_or_none(self, index: int) -> Image.Image | None:
        """The decoded image, or None if the file is unreadable (recorded like a failed :meth:`load`)."""
        if index in self.bad:
            return None
        try:
            return self._decode(index)
        except ImageLoadError as error:
            self.mark_bad(index, error)
            return None

    def close(self) -> None:
        self.pool.shutdown(wait=False)
