"""A cluttered-scene retrieval set made from real Flowers-102 photos (the setting of Detect-to-Retrieve).

Database images are *composites* (448 x 448 by default). Queries are clean, whole photos of the test classes;
a query's positives are the test composites that contain a photo of its class. Every test composite holds
**exactly one** object of a test class plus U{0..2} *distractor* objects of train classes, pasted the same
way, so finding the object is what counts, and the number of objects says nothing about the class (the
distractor counts are dealt evenly within every class: the object-count prior scores at chance, see
``ClutterBenchmark.reference_rows``).

How a composite is drawn (generator version 2; version 1 pasted hard-edged whole photos on a mosaic of photo
tiles, and a detector trained on it learned the paste edges: it boxed 3 of 4,696 real photos):

- **background**: a *foliage crop* of one train photo, resized over the whole canvas, under U{4..8} foliage
  patches of other train photos (soft collage, no seam). A foliage crop is a square of 0.3-0.5 x the photo's
  shorter side with at most 3 % *flower-like* pixels (:func:`flower_like`: anything but green vegetation,
  shadow, earth or dull grey); photos without one (about 3 in 4: the flower fills most of a Flowers-102 photo)
  are never backgrounds. So no unboxed flower sits in a background, which would teach a detector to ignore
  real flowers;
- **objects**: a crop of the photo around its centre (where Flowers-102 puts the flower; 0.55-1 x its sides,
  aspect changed by up to 1.5x), longer side log-uniform in 0.15-0.9 x the canvas (whole-frame flowers
  included), up to 20 % of it beyond the canvas border, alpha-blended through a soft superellipse mask
  (:func:`soft_mask`: exponent U(2, 4), alpha ramping over 0.2-0.5 of the half-axes); foliage patches use the
  same masks, so a soft edge does not mean "object";
- **no low-level tell**: an object's sharpness is drawn between its own and the background's (the collage is
  enlarged more than the objects), and the whole composite gets a mild blur (radius <= 0.6 px), sensor noise
  (s.d. <= 3 levels) and a JPEG quality of its own (75-95).

Rules, all checked by ``tests/data/test_clutter.py``:

- *test* composites paste exactly one test-class photo, never a query photo, plus 0-2 train-class distractors;
  their backgrounds use only train-class photos, so clutter is never a positive of a query;
- *train* composites (detector training, codebook / PCA fitting) paste 1-3 train-class photos on backgrounds
  made of train photos of *other* classes than the pasted objects';
- an object's *weight* in the composite is its alpha times (1 - alpha) of every object pasted over it; it is
  *visible* where that weight is >= 0.5, and every object keeps at least ``1 - max_occlusion`` (70 %) of its
  alpha >= 0.5 area visible (the part beyond the canvas counts as hidden); ``boxes.csv`` boxes the visible part;
- everything is a function of ``(seed, params, the source manifest)``: the same inputs give byte-identical
  images and manifests (for one Pillow / libjpeg build).

Layout written by :func:`build_clutter_set` (paths in every CSV are relative to the set's folder):

- ``images/test/NNNNNN.jpg``, ``images/train/NNNNNN.jpg``: the composites (JPEG);
- ``queries/<name>.jpg``: byte-for-byte copies of the query photos (so the set stands alone);
- ``images.csv`` ``file,split,class_ids``: one row per composite, test rows first; ``class_ids`` are the
  pasted objects' classes, space-separated, in paste order (a class may repeat in train composites);
- ``boxes.csv`` ``file,x1,y1,x2,y2,class_id,split``: one row per pasted object, in paste order (later rows
  of a file lie on top); coordinates normalised to [0, 1] by the canvas side, x to the right, y down,
  ``(x1, y1)`` the top-left and ``(x2, y2)`` the bottom-right corner (times the canvas side: the pixel box
  ``[x1, x2) x [y1, y2)`` of the object's visible pixels);
- ``queries.csv`` ``file,class_id,source``: the query photos (``source`` = path in the Flowers-102 pack);
- ``sources.csv`` ``file,role,order,source,class_id,crop,placed,mask``: the construction record of every
  composite: each pasted photo (``role`` = ``object``, ``order`` = paste order) and each background layer
  (``role`` = ``background``, order 0 the base, then the foliage patches in paste order); ``crop`` = the
  normalised ``x1 y1 x2 y2`` taken from the source photo, ``placed`` = the patch's ``x1 y1 x2 y2`` on the
  canvas (normalised; may pass its border), ``mask`` = the soft mask's ``exponent feather`` (empty for the base);
- ``params.json``: generator version, seed, :class:`ClutterParams`, the SHA-256 of the source manifest and
  the set's counts. Written last.

Building is atomic: the set is written into a temporary sibling folder that is renamed into place when
complete, so an interrupted build never leaves a half set at ``out_dir`` (a killed process may leave a
``.<name>.partial-*`` folder beside it, which is safe to delete). If ``out_dir`` already holds a set
with the same generator version, seed, parameters and source manifest, building is a no-op; a set built
otherwise is refused with a message naming the folder to delete (``overwrite=True`` replaces it, again
atomically).

Command line: ``python scripts/build_clutter.py FLOWERS_ROOT OUT_DIR [--seed S] [--test N] [--train N] [--canvas PX]``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .images import load_image
from .manifest import LabelledImageSet, ManifestError, read_csv_manifest, read_csv_rows

log = logging.getLogger(__name__)

#: Bumped whenever the generator's output for given params changes; part of a set's identity.
GENERATOR_VERSION = 2
DEFAULT_DIRNAME = "flowers102-clutter"
BOX_COLUMNS = ("file", "x1", "y1", "x2", "y2", "class_id", "split")
IMAGE_COLUMNS = ("file", "split", "class_ids")
QUERY_COLUMNS = ("file", "class_id", "source")
SOURCE_COLUMNS = ("file", "role", "order", "source", "class_id", "crop", "placed", "mask")
SOURCE_MANIFEST_COLUMNS = ("file", "class_id", "split")
SPLITS = ("test", "train")


class ClutterError(ManifestError):
    """A clutter set cannot be built or read (bad parameters, bad source, conflicting folder, bad CSV row)."""


@dataclass(frozen=True)
class ClutterParams:
    """Everything that shapes a clutter set besides the seed (and the source photos)."""

    canvas: int = 448                 #: side of the square composites, pixels
    test_composites: int = 1000       #: database composites (one test-class object each)
    train_composites: int = 1000      #: training composites (train classes)
    queries_per_class: int = 5        #: clean query photos per test class
    #: besides its one object, a composite holds U{0..max_distractors} distractor objects (train classes)
    max_distractors: int = 2
    min_scale: float = 0.15           #: a patch's longer side = log-uniform(min_scale, max_scale) x canvas
    max_scale: float = 0.9
    #: an object's crop of its photo: U(min_crop, 1) x the photo's sides, centred up to centre_jitter x its
    #: side off the photo's centre (the flower), aspect ratio changed by a factor up to max_aspect_change
    min_crop: float = 0.55
    centre_jitter: float = 0.08
    max_aspect_change: float = 1.5
    #: soft masks: a superellipse (exponent U(2, 4)) whose alpha ramps 0 -> 1 over U(min_feather,
    #: max_feather) x its half-axes, inwards from the patch border
    min_feather: float = 0.2
    max_feather: float = 0.5
    max_outside: float = 0.2          #: fraction of a patch's width / height that may lie beyond the canvas
    max_occlusion: float = 0.30       #: largest fraction of an object's alpha >= 0.5 area that may be hidden
    #: background: a foliage crop of one train photo covering the canvas under U{min..max} foliage patches of
    #: other train photos (longer side log-uniform(min_foliage_scale, max_foliage_scale) x canvas), pasted
    #: with the same soft masks as the objects: a soft collage with no seam, and a soft edge is no object cue
    min_foliage_patches: int = 4
    max_foliage_patches: int = 8
    min_foliage_scale: float = 0.25
    max_foliage_scale: float = 0.6
    #: a foliage crop is a square of U(min_foliage_crop, max_foliage_crop) x the photo's shorter side in which
    #: at most max_flower_fraction of the pixels may be flower-like (see flower_like); foliage_candidates
    #: squares are tried per photo, and a photo with none is never a background
    min_foliage_crop: float = 0.3
    max_foliage_crop: float = 0.5
    max_flower_fraction: float = 0.03
    foliage_candidates: int = 32
    #: an object's sharpness is drawn between its own and the background's (the median magnification of the
    #: background's layers; resampled through a smaller size), up to this fraction of the way: sharpness does
    #: not tell objects from background
    max_softening: float = 1.0
    #: the whole composite: Gaussian blur of radius U(0, max_blur) px, Gaussian noise of s.d. U(0, max_noise)
    #: grey levels, JPEG quality U{min_jpeg_quality..max_jpeg_quality}
    max_blur: float = 0.6
    max_noise: float = 3.0
    min_jpeg_quality: int = 75
    max_jpeg_quality: int = 95
    placement_tries: int = 100        #: random positions tried per object (then smaller sizes) before leaving it out

    def __post_init__(self):
        problems = []
        if self.canvas < 16:
            problems.append(f"canvas must be >= 16 px, got {self.canvas}")
        if self.test_composites < 1 or self.train_composites < 0:
            problems.append("test_composites must be >= 1 and train_composites >= 0")
        if self.queries_per_class < 1:
            problems.append(f"queries_per_class must be >= 1, got {self.queries_per_class}")
        if self.max_distractors < 0:
            problems.append(f"max_distractors must be >= 0, got {self.max_distractors}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            problems.append(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 < self.min_crop <= 1:
            problems.append(f"min_crop must be in (0, 1], got {self.min_crop}")
        if not 0 <= self.centre_jitter <= 0.5:
            problems.append(f"centre_jitter must be in [0, 0.5], got {self.centre_jitter}")
        if self.max_aspect_change < 1:
            problems.append(f"max_aspect_change must be >= 1, got {self.max_aspect_change}")
        if not 0 < self.min_feather <= self.max_feather <= 1:
            problems.append(f"need 0 < min_feather <= max_feather <= 1, got {self.min_feather}, {self.max_feather}")
        if not 0 <= self.max_outside < 0.5:
            problems.append(f"max_outside must be in [0, 0.5), got {self.max_outside}")
        if not 0 <= self.max_occlusion < 1:
            problems.append(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")
        if not 0 <= self.min_foliage_patches <= self.max_foliage_patches:
            problems.append(f"need 0 <= min_foliage_patches <= max_foliage_patches, got "
                            f"{self.min_foliage_patches}, {self.max_foliage_patches}")
        if not 0 < self.min_foliage_scale <= self.max_foliage_scale <= 1:
            problems.append(f"need 0 < min_foliage_scale <= max_foliage_scale <= 1, got {self.min_foliage_scale}, "
                            f"{self.max_foliage_scale}")
        if not 0 < self.min_foliage_crop <= self.max_foliage_crop <= 1:
            problems.append(f"need 0 < min_foliage_crop <= max_foliage_crop <= 1, got {self.min_foliage_crop}, "
                            f"{self.max_foliage_crop}")
        if not 0 <= self.max_flower_fraction <= 1:
            problems.append(f"max_flower_fraction must be in [0, 1], got {self.max_flower_fraction}")
        if self.foliage_candidates < 1:
            problems.append(f"foliage_candidates must be >= 1, got {self.foliage_candidates}")
        if not 0 <= self.max_softening <= 1:
            problems.append(f"max_softening must be in [0, 1], got {self.max_softening}")
        if self.max_blur < 0 or self.max_noise < 0:
            problems.append(f"max_blur and max_noise must be >= 0, got {self.max_blur}, {self.max_noise}")
        if not 1 <= self.min_jpeg_quality <= self.max_jpeg_quality <= 100:
            problems.append(f"need 1 <= min_jpeg_quality <= max_jpeg_quality <= 100, got {self.min_jpeg_quality}, "
                            f"{self.max_jpeg_quality}")
        if self.placement_tries < 1:
            problems.append(f"placement_tries must be >= 1, got {self.placement_tries}")
        if problems:
            raise ClutterError("invalid clutter parameters: " + "; ".join(problems))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "ClutterParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_clutter_dir(data_root: str | os.PathLike) -> Path:
    """Where the set lives by default: ``DATA_ROOT/flowers102-clutter``."""
    return Path(data_root) / DEFAULT_DIRNAME


# ---------------------------------------------------------------------------------------------------------
# Reading a built set.

@dataclass(frozen=True)
class ImageBoxes:
    """Images with their object boxes: ``boxes[i]`` is an (n_i, 4) float64 array of normalised
    ``[x1, y1, x2, y2]`` rows and ``labels[i]`` the (n_i,) int64 class ids, in paste order."""

    paths: tuple[Path, ...]
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    splits: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> "ImageBoxes":
        indices = [int(i) for i in indices]
        return ImageBoxes(paths=tuple(self.paths[i] for i in indices), boxes=tuple(self.boxes[i] for i in indices),
                          labels=tuple(self.labels[i] for i in indices),
                          splits=tuple(self.splits[i] for i in indices))


def _read_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV with ``required`` columns and no short rows; the header is line 1."""
    columns, rows = read_csv_rows(path, required, ClutterError)
    for line, row in rows:
        if None in row or any(row[c] is None for c in required):
            raise ClutterError(f"{path}, line {line}: expected {len(columns)} fields")
    return rows


def read_boxes_csv(path: str | os.PathLike, split: str | None = None) -> ImageBoxes:
    """Read ``boxes.csv`` (``file,x1,y1,x2,y2,class_id,split``, one row per object) into per-image box arrays.

    Parsed by :func:`data.boxes.read_box_csv` (the detector's reader: a malformed row, a non-integer class or
    one image in two splits raises an error naming the file and line); here ``class_id`` and ``split`` are
    required. Images come in the order of their first row; ``split`` keeps only that split's images.
    """
    from .boxes import read_box_csv

    path = Path(path)
    _read_rows(path, BOX_COLUMNS)  # the header check: a clutter set always labels and splits its boxes
    images = [image for image in read_box_csv(path, check_files=False) if split is None or image.split == split]
    if not images:
        raise ClutterError(f"{path}: no boxes" + (f" with split == {split!r}" if split is not None else ""))
    return ImageBoxes(paths=tuple(image.path for image in images),
                      boxes=tuple(image.boxes.astype(np.float64) for image in images),
                      labels=tuple(image.class_ids.astype(np.int64) for image in images),
                      splits=tuple(image.split for image in images))


@dataclass(frozen=True)
class ClutterSet:
    """A built set: the clean query photos and the test / train composites with their boxes."""

    root: Path
    queries: LabelledImageSet
    test: ImageBoxes
    train: ImageBoxes

    @property
    def params(self) -> dict:
        path = self.root / "params.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _read_images_csv(path: Path, boxes: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> dict[str, ImageBoxes]:
    """Per split, the composites of ``images.csv`` in its order, with their boxes (checked against it)."""
    per_split: dict[str, list] = {s: [] for s in SPLITS}
    seen = set()
    for line, row in _read_rows(path, IMAGE_COLUMNS):
        file, split = row["file"], row["split"]
        where = f"{path}, line {line} (file {file!r})"
        if split not in SPLITS:
            raise ClutterError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        if file in seen:
            raise ClutterError(f"{where}: listed twice")
        seen.add(file)
        try:
            class_ids = np.asarray([int(c) for c in row["class_ids"].split()], dtype=np.int64)
        except ValueError:
            raise ClutterError(f"{where}: class_ids must be space-separated integers, got {row['class_ids']!r}") \
                from None
        box, labels, box_split = boxes.get(file, (np.zeros((0, 4)), np.zeros(0, np.int64), split))
        if box_split != split or not np.array_equal(labels, class_ids):
            raise ClutterError(f"{where}: images.csv says split {split!r}, classes {class_ids.tolist()}, but "
                               f"boxes.csv has split {box_split!r}, classes {labels.tolist()} for it")
        per_split[split].append((path.parent / file, box, labels, split))
    extra = sorted(set(boxes) - seen)
    if extra:
        raise ClutterError(f"{path}: boxes.csv has boxes for {len(extra)} image(s) not listed here, e.g. {extra[0]!r}")
    return {s: ImageBoxes(paths=tuple(r[0] for r in rows), boxes=tuple(r[1] for r in rows),
                          labels=tuple(r[2] for r in rows), splits=tuple(r[3] for r in rows))
            for s, rows in per_split.items()}


def load_clutter_set(root: str | os.PathLike) -> ClutterSet:
    """Read a set written by :func:`build_clutter_set` (or by hand in the same layout; ``params.json`` and
    ``sources.csv`` are optional). ``images.csv`` and ``boxes.csv`` must agree on every composite's classes."""
    root = Path(root)
    boxes_path = root / "boxes.csv"
    boxes: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    if _read_rows(boxes_path, BOX_COLUMNS):
        found = read_boxes_csv(boxes_path)
        for p, b, lbl, s in zip(found.paths, found.boxes, found.labels, found.splits):
            boxes[p.relative_to(root).as_posix()] = (b, lbl, s)
    splits = _read_images_csv(root / "images.csv", boxes)
    if not len(splits["test"]):
        raise ClutterError(f"{root / 'images.csv'}: no test composites")
    queries = read_csv_manifest(root / "queries.csv", name=f"{root.name}-queries")
    return ClutterSet(root=root, queries=queries, test=splits["test"], train=splits["train"])


# ---------------------------------------------------------------------------------------------------------
# Building.

@dataclass(frozen=True)
class _Source:
    file: str
    class_id: int
    split: str


@dataclass
class _Layer:
    """One soft-pasted patch: a crop of a source photo and where it went."""

    source: int                                          # index into the source list
    crop: tuple[float, float, float, float]              # normalised [x1, y1, x2, y2] in the source photo
    placed: tuple[int, int, int, int]                    # the patch on the canvas, pixels (may pass its border)
    mask: tuple[float, float] | None = None              # soft mask (exponent, feather); None: the opaque base
    box: tuple[int, int, int, int] | None = None         # objects: pixel box of their visible (weight >= 0.5) part


@dataclass
class _Composite:
    """What one composite is made of (filled in while rendering)."""

    file: str
    split: str
    objects: list[int]                                   # source indices to paste, in paste order
    placed: list[_Layer] = field(default_factory=list)   # the objects pasted (one may be left out)
    background: list[_Layer] = field(default_factory=list)  # the foliage base, then the foliage patches


def _read_sources(flowers_root: Path) -> tuple[list[_Source], str]:
    labels = flowers_root / "labels.csv"
    if not labels.is_file():
        raise ClutterError(f"Flowers-102 manifest not found: {labels} (needed to build the clutter set; "
                           "scripts/prepare_flowers102.py prepares it)")
    sources, seen = [], set()
    for line, row in _read_rows(labels, SOURCE_MANIFEST_COLUMNS):
        if row["split"] not in SPLITS:
            raise ClutterError(f"{labels}, line {line}: split must be one of {SPLITS}, got {row['split']!r}")
        try:
            class_id = int(row["class_id"])
        except ValueError:
            raise ClutterError(f"{labels}, line {line}: class_id {row['class_id']!r} is not an integer") from None
        if row["file"] in seen:
            raise ClutterError(f"{labels}, line {line}: {row['file']!r} listed twice")
        seen.add(row["file"])
        sources.append(_Source(row["file"], class_id, row["split"]))
    train_classes = {s.class_id for s in sources if s.split == "train"}
    test_classes = {s.class_id for s in sources if s.split == "test"}
    if not train_classes or not test_classes:
        raise ClutterError(f"{labels}: needs photos of both splits (train: {len(train_classes)} classes, "
                           f"test: {len(test_classes)})")
    if train_classes & test_classes:
        raise ClutterError(f"{labels}: classes {sorted(train_classes & test_classes)[:5]} are in both splits; "
                           "the clutter set needs class-disjoint splits")
    return sources, hashlib.sha256(labels.read_bytes()).hexdigest()


def _identity(seed: int, params: ClutterParams, source_sha256: str) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "params": params.to_json(),
            "source_manifest_sha256": source_sha256}


def _differences(found: dict, wanted: dict) -> list[str]:
    if found.get("generator_version") != wanted["generator_version"]:  # other parameters: not worth listing
        return [f"generator_version: {found.get('generator_version')!r} -> {wanted['generator_version']!r}"]
    diffs = []
    for key, value in wanted.items():
        if key == "params":
            theirs = found.get("params") or {}
            diffs += [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in value.items() if theirs.get(k) != v]
        elif found.get(key) != value:
            diffs.append(f"{key}: {found.get(key)!r} -> {value!r}")
    return diffs


def _choose_queries(sources: list[_Source], per_class: int, rng: np.random.Generator) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        if s.split == "test":
            by_class.setdefault(s.class_id, []).append(i)
    chosen = []
    for class_id in sorted(by_class):
        members = by_class[class_id]
        if len(members) <= per_class:
            raise ClutterError(f"test class {class_id} has {len(members)} photos: needs more than "
                               f"queries_per_class = {per_class} (the rest are pasted into composites)")
        chosen += [members[j] for j in np.sort(rng.choice(len(members), per_class, replace=False))]
    return chosen


def _plan(split: str, count: int, pool: list[int], distractor_pool: list[int], sources: list[_Source],
          params: ClutterParams, rng: np.random.Generator) -> list[_Composite]:
    """The photos each composite pastes: its object dealt from a shuffled deck of ``pool`` (every photo once
    before any repeats), U{0..max_distractors} distractors from a deck of ``distractor_pool``, in random paste
    order, never the same photo twice in one composite.

    The number of distractors is dealt *per object class* (each class's composites cycle through 0, 1, ...,
    max_distractors from a random start, in random order), so that a composite's object count says nothing
    about its class: the object-count prior of the benchmark stays at chance."""
    objects = _Deck(pool, rng)
    mains = [objects.deal(()) for _ in range(count)]
    levels = params.max_distractors + 1
    distractor_counts = np.zeros(count, dtype=np.int64)
    classes = np.asarray([sources[m].class_id for m in mains], dtype=np.int64)
    for class_id in np.unique(classes):
        members = np.flatnonzero(classes == class_id)
        cycle = (np.arange(len(members)) + rng.integers(levels)) % levels
        distractor_counts[members[rng.permutation(len(members))]] = cycle
    distractors = _Deck(distractor_pool, rng)
    plans = []
    for i, (main, wanted) in enumerate(zip(mains, distractor_counts)):
        chosen = [main]
        for _ in range(min(int(wanted), len(set(distractor_pool) - {main}))):
            chosen.append(distractors.deal(chosen))
        order = rng.permutation(len(chosen))
        plans.append(_Composite(file=f"images/{split}/{i:06d}.jpg", split=split,
                                objects=[chosen[j] for j in order]))
    return plans


class _Deck:
    """Photos dealt from a shuffled deck of a pool: every photo once before any repeats."""

    def __init__(self, pool: list[int], rng: np.random.Generator):
        self.pool, self.rng, self.cards = list(pool), rng, []

    def deal(self, exclude) -> int:
        while True:
            if not self.cards:
                self.cards = [self.pool[j] for j in self.rng.permutation(len(self.pool))]
            card = self.cards.pop()
            if card not in exclude:
                return card


# -- foliage backgrounds -------------------------------------------------------------------------------------

def flower_like(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels -> (H, W) bool, True where a pixel may belong to a flower.

    Conservative on purpose: a pixel is *not* flower-like only when it is green vegetation (hue 68-175 degrees,
    saturation >= 0.12), shadow (value < 0.2), earth (hue 10-68 degrees, saturation < 0.55, value < 0.5) or dull
    grey (saturation < 0.12, value < 0.6), in Pillow's HSV (every channel 0-255). Any other colour (bright or
    saturated off the green range, white, sky) counts as flower-like, so a crop with few flower-like pixels is
    leaves, soil or shade. (No segmentation of Flowers-102 ships with the pack; colour is what there is.)"""
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("HSV"),
                     dtype=np.float32) / 255.0
    hue, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    shadow = value < 0.2
    green = (hue >= 68) & (hue <= 175) & (saturation >= 0.12)
    earth = (hue >= 10) & (hue < 68) & (saturation < 0.55) & (value < 0.5)
    grey = (saturation < 0.12) & (value < 0.6)
    return ~(shadow | green | earth | grey)


def _foliage_crops(sources: list[_Source], pool: list[int], flowers_root: Path, params: ClutterParams, seed: int,
                   progress: bool) -> dict[int, list[tuple[int, int, int]]]:
    """Per photo of ``pool`` that has any, its foliage squares ``(x, y, side)`` in pixels: of
    ``foliage_candidates`` random squares (side U(min_foliage_crop, max_foliage_crop) x the shorter side, drawn
    from the photo's own generator), those with at most ``max_flower_fraction`` flower-like pixels."""
    from tqdm.auto import tqdm

    found = {}
    for index in tqdm(pool, desc="foliage crops", unit="photo", dynamic_ncols=True, mininterval=0.5,
                      disable=None if progress else True):
        rng = np.random.default_rng([seed, 5, index])
        mask = flower_like(np.asarray(load_image(flowers_root / sources[index].file)))
        integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        height, width = mask.shape
        crops = []
        for _ in range(params.foliage_candidates):
            side = max(1, round(rng.uniform(params.min_foliage_crop, params.max_foliage_crop) * min(width, height)))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            flowers = integral[y + side, x + side] - integral[y, x + side] - integral[y + side, x] + integral[y, x]
            if flowers <= params.max_flower_fraction * side * side:
                crops.append((x, y, side))
        if crops:
            found[index] = crops
    return found


# -- soft pastes -------------------------------------------------------------------------------------------

def soft_mask(width: int, height: int, exponent: float, feather: float) -> np.ndarray:
    """(height, width) float32 alpha of a superellipse ``|u|^p + |v|^p <= 1`` filling the patch (u, v in [-1, 1]
    at pixel centres): with ``r = (|u|^p + |v|^p)^(1/p)``, alpha = smoothstep((1 - r) / feather), so 1 inside
    ``r <= 1 - feather``, 0 at the patch border, and exactly 0.5 at ``r = 1 - feather / 2``."""
    u = np.abs((np.arange(width, dtype=np.float64) + 0.5) / width * 2 - 1)
    v = np.abs((np.arange(height, dtype=np.float64) + 0.5) / height * 2 - 1)
    radius = (u[None, :] ** exponent + v[:, None] ** exponent) ** (1.0 / exponent)
    t = np.clip((1.0 - radius) / feather, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _resample(photo: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """The ``box`` of ``photo`` resized to ``size`` (Lanczos when shrinking, bicubic when enlarging)."""
    shrinking = size[0] < box[2] - box[0]
    return photo.resize(size, Image.LANCZOS if shrinking else Image.BICUBIC, box=box)


def _random_transpose(image: Image.Image, rng: np.random.Generator, rotate: bool) -> Image.Image:
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rotate:
        turns = int(rng.integers(4))
        image = image.rotate(90 * turns, expand=True) if turns else image
    return image


def _patch_size(aspect: float, scales: tuple[float, float], side: int, rng: np.random.Generator
                ) -> tuple[int, int]:
    """(width, height) of a patch of ``aspect`` = width / height whose longer side is log-uniform in
    [scales[0], scales[1]] x ``side``."""
    longer = side * float(np.exp(rng.uniform(np.log(scales[0]), np.log(scales[1]))))
    if aspect >= 1:
        return max(2, round(longer)), max(2, round(longer / aspect))
    return max(2, round(longer * aspect)), max(2, round(longer))


def _object_crop(width: int, height: int, params: ClutterParams, rng: np.random.Generator
                 ) -> tuple[float, float, float, float]:
    """A crop around the photo's centre, where Flowers-102 puts the flower: U(min_crop, 1) x the photo's sides,
    aspect ratio times exp(U(-ln a, ln a)), centre jittered, kept inside the photo."""
    fraction = rng.uniform(params.min_crop, 1.0)
    stretch = float(np.exp(rng.uniform(-np.log(params.max_aspect_change), np.log(params.max_aspect_change))))
    crop_w = min(width, fraction * width * np.sqrt(stretch))
    crop_h = min(height, fraction * height / np.sqrt(stretch))
    centre_x = width / 2 + rng.uniform(-params.centre_jitter, params.centre_jitter) * width
    centre_y = height / 2 + rng.uniform(-params.centre_jitter, params.centre_jitter) * height
    left = float(np.clip(centre_x - crop_w / 2, 0, width - crop_w))
    top = float(np.clip(centre_y - crop_h / 2, 0, height - crop_h))
    return left, top, left + crop_w, top + crop_h


def _position(width: int, height: int, params: ClutterParams, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a patch: at most ``max_outside`` of its width / height beyond the canvas."""
    out_x, out_y = int(params.max_outside * width), int(params.max_outside * height)
    return (int(rng.integers(-out_x, params.canvas - width + out_x + 1)),
            int(rng.integers(-out_y, params.canvas - height + out_y + 1)))


def _clip(x: int, y: int, width: int, height: int, side: int) -> tuple[slice, slice, slice, slice]:
    """(canvas rows, canvas columns, patch rows, patch columns) of a patch at (x, y) clipped to the canvas."""
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + width, side), min(y + height, side)
    return slice(y1, y2), slice(x1, x2), slice(y1 - y, y2 - y), slice(x1 - x, x2 - x)


def _blend(canvas: np.ndarray, patch: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    rows, cols, patch_rows, patch_cols = _clip(x, y, alpha.shape[1], alpha.shape[0], canvas.shape[0])
    a = alpha[patch_rows, patch_cols, None]
    canvas[rows, cols] = a * patch[patch_rows, patch_cols] + (1 - a) * canvas[rows, cols]


class _Visibility:
    """Each pasted object's weight in the final composite, ``alpha_k * prod over later objects j of (1 - alpha_j)``,
    as a canvas map; an object is *visible* where its weight is >= 0.5 (that is where boxes.csv boxes it)."""

    def __init__(self, side: int, max_occlusion: float):
        self.side, self.max_occlusion = side, max_occlusion
        self.weights: list[np.ndarray] = []
        self.visible: list[int] = []      # pixels of weight >= 0.5 on the canvas, per object
        self.full: list[int] = []         # pixels of alpha >= 0.5 of the whole patch (beyond the canvas too)

    def admits(self, alpha: np.ndarray, x: int, y: int) -> list[int] | None:
        """The visible areas after pasting ``alpha`` at (x, y) (earlier objects', then its own), or None when
        that would leave some object, the new one included, less than (1 - max_occlusion) of its area."""
        rows, cols, patch_rows, patch_cols = _clip(x, y, alpha.shape[1], alpha.shape[0], self.side)
        region = alpha[patch_rows, patch_cols]
        keep = 1 - self.max_occlusion
        own = int(np.count_nonzero(region >= 0.5))
        if own < keep * int(np.count_nonzero(alpha >= 0.5)) - 1e-9:
            return None
        after = []
        for weight, visible, full in zip(self.weights, self.visible, self.full):
            under = weight[rows, cols]
            left = visible - int(np.count_nonzero(under >= 0.5)) + int(np.count_nonzero(under * (1 - region) >= 0.5))
            if left < keep * full - 1e-9:
                return None
            after.append(left)
        return after + [own]

    def add(self, alpha: np.ndarray, x: int, y: int, visible: list[int]) -> None:
        rows, cols, patch_rows, patch_cols = _clip(x, y, alpha.shape[1], alpha.shape[0], self.side)
        region = alpha[patch_rows, patch_cols]
        for weight in self.weights:
            weight[rows, cols] *= 1 - region
        weight = np.zeros((self.side, self.side), dtype=np.float32)
        weight[rows, cols] = region
        self.weights.append(weight)
        self.full.append(int(np.count_nonzero(alpha >= 0.5)))
        self.visible = visible

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Per object, the pixel box ``[x1, x2) x [y1, y2)`` of its visible pixels."""
        found = []
        for weight in self.weights:
            ys, xs = np.nonzero(weight >= 0.5)
            found.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        return found


def _mask_shape(params: ClutterParams, rng: np.random.Generator) -> tuple[float, float]:
    return rng.uniform(2.0, 4.0), rng.uniform(params.min_feather, params.max_feather)


def _render(composite: _Composite, sources: list[_Source], foliage: dict[int, list[tuple[int, int, int]]],
            background_pool: list[int], flowers_root: Path, params: ClutterParams, rng: np.random.Generator
            ) -> tuple[Image.Image, int]:
    """Draw one composite; fills ``composite.placed`` / ``.background``; returns the image and its JPEG quality."""
    side = params.canvas

    def foliage_crop(index: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
        x, y, crop_side = foliage[index][int(rng.integers(len(foliage[index])))]
        return load_image(flowers_root / sources[index].file), (x, y, x + crop_side, y + crop_side)

    def record(index: int, photo: Image.Image, box, placed, mask=None) -> _Layer:
        crop = (box[0] / photo.width, box[1] / photo.height, box[2] / photo.width, box[3] / photo.height)
        return _Layer(index, crop, placed, mask)

    # the background: one photo's foliage square over the whole canvas ...
    order = [background_pool[j] for j in rng.permutation(len(background_pool))]
    base, patches = order[0], order[1:1 + int(rng.integers(params.min_foliage_patches,
                                                            params.max_foliage_patches + 1))]
    photo, box = foliage_crop(base)
    canvas = np.asarray(_random_transpose(_resample(photo, (side, side), box), rng, rotate=True), dtype=np.float32)
    composite.background.append(record(base, photo, box, (0, 0, side, side)))
    magnifications = [side / (box[2] - box[0])]
    # ... and foliage patches of other photos, soft-pasted exactly as the objects will be
    for index in patches:
        photo, box = foliage_crop(index)
        aspect = float(np.exp(rng.uniform(-np.log(params.max_aspect_change), np.log(params.max_aspect_change))))
        width, height = _patch_size(aspect, (params.min_foliage_scale, params.max_foliage_scale), side, rng)
        magnifications.append(width / (box[2] - box[0]))
        patch = _random_transpose(_resample(photo, (width, height), box), rng, rotate=False)
        mask_shape = _mask_shape(params, rng)
        alpha = soft_mask(width, height, *mask_shape)
        x, y = _position(width, height, params, rng)
        _blend(canvas, np.asarray(patch, dtype=np.float32), alpha, x, y)
        composite.background.append(record(index, photo, box, (x, y, x + width, y + height), mask_shape))

    background_magnification = float(np.median(magnifications))
    visibility = _Visibility(side, params.max_occlusion)
    for index in composite.objects:
        photo = load_image(flowers_root / sources[index].file)
        box = _object_crop(photo.width, photo.height, params, rng)
        width, height = _patch_size((box[2] - box[0]) / (box[3] - box[1]), (params.min_scale, params.max_scale),
                                    side, rng)
        flip = rng.random() < 0.5
        mask_shape = _mask_shape(params, rng)
        softening = rng.uniform(0.0, params.max_softening)
        for shrink in (1.0, 0.8, 0.64):  # a crowded canvas: try smaller sizes before leaving the object out
            size = (max(2, round(width * shrink)), max(2, round(height * shrink)))
            alpha = soft_mask(*size, *mask_shape)
            for _ in range(params.placement_tries):
                x, y = _position(*size, params, rng)
                visible = visibility.admits(alpha, x, y)
                if visible is not None:
                    break
            else:
                continue
            break
        else:
            log.debug("%s: no place for %s; left out", composite.file, sources[index].file)
            continue
        # sharpness between the object's own and the background's: resample through a smaller size
        magnification = size[0] / (box[2] - box[0])
        target = magnification + softening * max(0.0, background_magnification - magnification)
        if target > magnification * 1.05:
            small = (max(1, round(size[0] * magnification / target)), max(1, round(size[1] * magnification / target)))
            patch = _resample(photo, small, box).resize(size, Image.BICUBIC)
        else:
            patch = _resample(photo, size, box)
        if flip:
            patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
        _blend(canvas, np.asarray(patch, dtype=np.float32), alpha, x, y)
        visibility.add(alpha, x, y, visible)
        composite.placed.append(record(index, photo, box, (x, y, x + size[0], y + size[1]), mask_shape))
    for layer, pixel_box in zip(composite.placed, visibility.boxes()):
        layer.box = pixel_box

    # the whole composite: mild blur, sensor noise, a JPEG quality of its own
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    radius = rng.uniform(0.0, params.max_blur)
    if radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    sigma = rng.uniform(0.0, params.max_noise)
    if sigma > 0:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, (side, side, 3))
        image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return image, int(rng.integers(params.min_jpeg_quality, params.max_jpeg_quality + 1))


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _corners(values, scale: float = 1.0) -> str:
    return " ".join(f"{v / scale:.6f}" for v in values)


def _build_into(folder: Path, flowers_root: Path, sources: list[_Source], identity: dict, seed: int,
                params: ClutterParams, progress: bool) -> None:
    query_ids = _choose_queries(sources, params.queries_per_class, np.random.default_rng([seed, 0]))
    excluded = set(query_ids)
    test_pool = [i for i, s in enumerate(sources) if s.split == "test" and i not in excluded]
    train_pool = [i for i, s in enumerate(sources) if s.split == "train"]
    plans = (_plan("test", params.test_composites, test_pool, train_pool, sources, params,
                   np.random.default_rng([seed, 1]))
             + _plan("train", params.train_composites, train_pool, train_pool, sources, params,
                     np.random.default_rng([seed, 2])))
    foliage = _foliage_crops(sources, train_pool, flowers_root, params, seed, progress)
    backgrounds = sorted(foliage)
    if len(backgrounds) < params.max_foliage_patches + 1:
        raise ClutterError(f"only {len(backgrounds)} train photos have a foliage crop (at most "
                           f"{params.max_flower_fraction} flower-like pixels); a background needs "
                           f"{params.max_foliage_patches + 1}")

    (folder / "queries").mkdir()
    query_rows = []
    for i in query_ids:
        name = f"queries/{Path(sources[i].file).name}"
        if (folder / name).exists():
            raise ClutterError(f"two query photos share the file name {name!r}")
        shutil.copyfile(flowers_root / sources[i].file, folder / name)
        query_rows.append({"file": name, "class_id": sources[i].class_id, "source": sources[i].file})

    from tqdm.auto import tqdm

    for split in SPLITS:
        (folder / "images" / split).mkdir(parents=True)
    background_classes = np.asarray([sources[i].class_id for i in backgrounds])
    with tqdm(total=len(plans), desc="clutter composites", unit="img", dynamic_ncols=True, mininterval=0.5,
              disable=None if progress else True) as bar:
        for n, composite in enumerate(plans):
            split_code = SPLITS.index(composite.split)
            index = n if split_code == 0 else n - params.test_composites
            pool = backgrounds
            if composite.split == "train":  # backgrounds from train photos of other classes than the objects'
                object_classes = [sources[i].class_id for i in composite.objects]
                pool = [backgrounds[j] for j in np.flatnonzero(~np.isin(background_classes, object_classes))]
                if len(pool) < params.max_foliage_patches + 1:
                    raise ClutterError(f"too few foliage photos of other classes than {object_classes} for the "
                                       "background of a train composite (too few train classes)")
            image, quality = _render(composite, sources, foliage, pool, flowers_root, params,
                                     np.random.default_rng([seed, 3 + split_code, index]))
            image.save(folder / composite.file, format="JPEG", quality=quality)
            bar.update()

    side = params.canvas
    image_rows, box_rows, source_rows = [], [], []
    for composite in plans:
        image_rows.append({"file": composite.file, "split": composite.split,
                           "class_ids": " ".join(str(sources[layer.source].class_id) for layer in composite.placed)})
        for role, layers in (("object", composite.placed), ("background", composite.background)):
            for order, layer in enumerate(layers):
                source = sources[layer.source]
                if role == "object":
                    corners = {k: f"{v / side:.6f}" for k, v in zip(("x1", "y1", "x2", "y2"), layer.box)}
                    box_rows.append({"file": composite.file, **corners, "class_id": source.class_id,
                                     "split": composite.split})
                source_rows.append({"file": composite.file, "role": role, "order": order, "source": source.file,
                                    "class_id": source.class_id, "crop": _corners(layer.crop),
                                    "placed": _corners(layer.placed, side),
                                    "mask": "" if layer.mask is None else _corners(layer.mask)})
    _write_csv(folder / "queries.csv", QUERY_COLUMNS, query_rows)
    _write_csv(folder / "images.csv", IMAGE_COLUMNS, image_rows)
    _write_csv(folder / "boxes.csv", BOX_COLUMNS, box_rows)
    _write_csv(folder / "sources.csv", SOURCE_COLUMNS, source_rows)
    counts = {"queries": len(query_rows), "query_classes": len({r["class_id"] for r in query_rows}),
              "test_composites": sum(c.split == "test" for c in plans),
              "train_composites": sum(c.split == "train" for c in plans),
              "test_objects": sum(len(c.placed) for c in plans if c.split == "test"),
              "train_objects": sum(len(c.placed) for c in plans if c.split == "train"),
              "objects_left_out": sum(len(c.objects) - len(c.placed) for c in plans),
              "foliage_photos": len(backgrounds), "train_photos": len(train_pool)}
    (folder / "params.json").write_text(json.dumps({**identity, "counts": counts}, indent=2, sort_keys=True) + "\n")


def _read_identity(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):
        return None


def build_clutter_set(flowers_root: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                      params: ClutterParams | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Build the clutter set from the Flowers-102 pack at ``flowers_root`` into ``out_dir``; returns ``out_dir``.

    A no-op when ``out_dir`` already holds the set of this seed, ``params`` and source manifest. Any other
    non-empty ``out_dir`` is refused (:class:`ClutterError` naming the folder to delete) unless ``overwrite``,
    which replaces it. The set is written into a temporary sibling folder and renamed into place when
    complete, so an interrupted build leaves ``out_dir`` as it was. When the pack is missing but ``out_dir``
    holds a set of this seed and ``params``, that set is used (its source cannot be checked: a warning).
    """
    flowers_root, out_dir = Path(flowers_root), Path(out_dir)
    params = params or ClutterParams()
    existing = _read_identity(out_dir) if out_dir.is_dir() else None
    if existing is not None and not (flowers_root / "labels.csv").is_file():
        wanted = _identity(seed, params, existing.get("source_manifest_sha256"))
        if not _differences(existing, wanted):
            log.warning("%s: using the existing clutter set; its source %s is missing, so it is not checked",
                        out_dir, flowers_root / "labels.csv")
            return out_dir
    sources, source_sha256 = _read_sources(flowers_root)
    identity = _identity(seed, params, source_sha256)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if existing is not None and not _differences(existing, identity):
            log.info("clutter set %s is up to date (seed %d)", out_dir, seed)
            return out_dir
        reason = ("was built differently: " + "; ".join(_differences(existing, identity)) if existing is not None
                  else "is not empty and holds no clutter set (no readable params.json)")
        if not overwrite:
            raise ClutterError(f"{out_dir} {reason}. Delete that folder to rebuild it "
                               "(or build into another folder, or pass overwrite=True)")
        log.warning("%s %s; rebuilding it", out_dir, reason)
    elif out_dir.exists() and not out_dir.is_dir():
        raise ClutterError(f"{out_dir} exists and is not a folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    start = time.perf_counter()
    try:
        log.info("building clutter set %s from %s (seed %d): %d test + %d train composites of %d px",
                 out_dir, flowers_root, seed, params.test_composites, params.train_composites, params.canvas)
        _build_into(staging, flowers_root, sources, identity, seed, params, progress)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _move_into_place(staging, out_dir, identity, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("clutter set %s built in %.1f s", out_dir, time.perf_counter() - start)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out_dir: Path, identity: dict, overwrite: bool) -> None:
    """Rename ``staging`` to ``out_dir``: replaces a missing or empty folder, keeps an identical set another
    process finished meanwhile, replaces any other folder only with ``overwrite`` (renaming it away first)."""
    try:
        os.rename(staging, out_dir)  # replaces a missing or empty folder atomically
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    existing = _read_identity(out_dir)
    if existing is not None and not _differences(existing, identity):  # another process built the same set
        log.info("%s was built meanwhile by another process; keeping it", out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        return
    if not overwrite:
        raise ClutterError(f"{out_dir} was filled by another process while this build ran; delete that folder "
                           "to rebuild it")
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, retired / out_dir.name)
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)
