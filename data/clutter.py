"""A cluttered-scene retrieval set made from real Flowers-102 photos (the setting of Detect-to-Retrieve).

Database images are *composites*: a canvas (448 x 448 by default) covered by a mosaic of random crops of
*train-class* photos (the clutter), on which 1-3 whole flower photos are pasted at random positions and
scales. Queries are clean, whole photos of the test classes; a query's positives are the test composites
that contain a photo of its class. The pasted objects are small (longer side U(0.10, 0.40) x the canvas
side), so a global descriptor of the whole composite mixes the object with clutter; regional search
(detect the objects, describe each region) is what the set is for.

Rules, all checked by ``tests/data/test_clutter.py``:

- *test* composites paste photos of the test classes and never a query photo; their backgrounds use only
  train-class photos, so clutter is never a positive of a query;
- *train* composites (detector training, codebook / PCA fitting) paste train-class photos on backgrounds made
  of train photos of *other* classes than the pasted objects';
- an object keeps its aspect ratio and lies fully inside the canvas; a later object may cover part of an
  earlier one, but every object keeps at least ``1 - max_occlusion`` (70 %) of its area visible, counting
  the union of everything pasted over it;
- everything is a function of ``(seed, params, the source manifest)``: the same inputs give byte-identical
  images and manifests (for one Pillow / libjpeg build).

Layout written by :func:`build_clutter_set` (paths in every CSV are relative to the set's folder):

- ``images/test/NNNNNN.jpg``, ``images/train/NNNNNN.jpg``: the composites (JPEG, quality 90);
- ``queries/<name>.jpg``: byte-for-byte copies of the query photos (so the set stands alone);
- ``images.csv`` ``file,split,class_ids``: one row per composite, test rows first; ``class_ids`` are the
  pasted objects' classes, space-separated, in paste order (a class may repeat);
- ``boxes.csv`` ``file,x1,y1,x2,y2,class_id,split``: one row per pasted object, in paste order (later rows
  of a file lie on top); coordinates normalised to [0, 1] by the canvas side, x to the right, y down,
  ``(x1, y1)`` the top-left and ``(x2, y2)`` the bottom-right corner (multiply by the canvas side for the
  pixel box ``[x1, x2) x [y1, y2)``, whose pixels are exactly the pasted photo's);
- ``queries.csv`` ``file,class_id,source``: the query photos (``source`` = path in the Flowers-102 pack);
- ``sources.csv`` ``file,role,order,source,class_id``: the construction record of every composite: each
  pasted photo (``role`` = ``object``, ``order`` = paste order) and each background tile's photo (``role`` =
  ``background``, ``order`` = tile order), ``source`` relative to the Flowers-102 pack;
- ``params.json``: generator version, seed, :class:`ClutterParams`, the SHA-256 of the source manifest and
  the set's counts. Written last.

Building is atomic: the set is written into a temporary sibling folder that is renamed into place when
complete, so an interrupted build never leaves a half set at ``out_dir`` (a killed process may leave a
``.<name>.partial-*`` folder beside it, which is safe to delete). If ``out_dir`` already holds a set
with the same seed, parameters and source manifest, building is a no-op; a set built otherwise is refused
with a message naming the folder to delete (``overwrite=True`` replaces it, again atomically).

Command line: ``python -m data.clutter FLOWERS_ROOT OUT_DIR [--seed S] [--test N] [--train N] [--canvas PX]``.
"""
from __future__ import annotations

import argparse
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
from PIL import Image

from .images import load_image
from .manifest import LabelledImageSet, ManifestError, read_csv_manifest, read_csv_rows

log = logging.getLogger("data.clutter")  # also when run as __main__

#: Bumped whenever the generator's output for given params changes; part of a set's identity.
GENERATOR_VERSION = 1
DEFAULT_DIRNAME = "flowers102-clutter"
BOX_COLUMNS = ("file", "x1", "y1", "x2", "y2", "class_id", "split")
IMAGE_COLUMNS = ("file", "split", "class_ids")
QUERY_COLUMNS = ("file", "class_id", "source")
SOURCE_COLUMNS = ("file", "role", "order", "source", "class_id")
SOURCE_MANIFEST_COLUMNS = ("file", "class_id", "split")
SPLITS = ("test", "train")


class ClutterError(ManifestError):
    """A clutter set cannot be built or read (bad parameters, bad source, conflicting folder, bad CSV row)."""


@dataclass(frozen=True)
class ClutterParams:
    """Everything that shapes a clutter set besides the seed (and the source photos)."""

    canvas: int = 448                 #: side of the square composites, pixels
    test_composites: int = 1000       #: database composites (test classes)
    train_composites: int = 1000      #: training composites (train classes)
    queries_per_class: int = 5        #: clean query photos per test class
    min_objects: int = 1              #: pasted photos per composite, uniform in [min_objects, max_objects]
    max_objects: int = 3
    min_scale: float = 0.10           #: object's longer side = U(min_scale, max_scale) x canvas
    max_scale: float = 0.40
    max_occlusion: float = 0.30       #: largest fraction of an object's area that later objects may cover
    min_cells: int = 2                #: background mosaic: rows, and tiles per row, uniform in [min, max]
    max_cells: int = 4
    #: a background tile is a crop of U(min_tile_crop, 1) x the largest crop of its aspect ratio in the photo
    min_tile_crop: float = 0.6
    jpeg_quality: int = 90
    placement_tries: int = 100        #: random positions tried per object before it is left out

    def __post_init__(self):
        problems = []
        if self.canvas < 16:
            problems.append(f"canvas must be >= 16 px, got {self.canvas}")
        if self.test_composites < 1 or self.train_composites < 0:
            problems.append("test_composites must be >= 1 and train_composites >= 0")
        if self.queries_per_class < 1:
            problems.append(f"queries_per_class must be >= 1, got {self.queries_per_class}")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            problems.append(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_occlusion < 1:
            problems.append(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")
        if not 1 <= self.min_cells <= self.max_cells:
            problems.append(f"need 1 <= min_cells <= max_cells, got {self.min_cells}, {self.max_cells}")
        if not 0 < self.min_tile_crop <= 1:
            problems.append(f"min_tile_crop must be in (0, 1], got {self.min_tile_crop}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
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
class _Composite:
    """What one composite is made of (filled in while rendering)."""

    file: str
    split: str
    objects: list[int]                                  # source indices to paste, in order
    placed: list[tuple[int, tuple[int, int, int, int]]] = field(default_factory=list)  # (source, pixel box)
    background: list[int] = field(default_factory=list)


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


def _plan(split: str, count: int, pool: list[int], params: ClutterParams, rng: np.random.Generator
          ) -> list[_Composite]:
    """The photos each composite pastes: dealt from a shuffled deck of ``pool`` (every photo once before any
    repeats), never the same photo twice in one composite."""
    deck: list[int] = []
    plans = []
    for i in range(count):
        wanted = int(rng.integers(params.min_objects, params.max_objects + 1))
        chosen: list[int] = []
        while len(chosen) < min(wanted, len(pool)):
            if not deck:
                deck = [pool[j] for j in rng.permutation(len(pool))]
            candidate = deck.pop()
            if candidate not in chosen:
                chosen.append(candidate)
        plans.append(_Composite(file=f"images/{split}/{i:06d}.jpg", split=split, objects=chosen))
    return plans


def _partition(rng: np.random.Generator, length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive non-empty spans covering [0, length), sizes within a factor 3 of each other."""
    weights = rng.uniform(0.5, 1.5, parts)
    edges = np.round(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * length).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _mosaic_cells(rng: np.random.Generator, side: int, params: ClutterParams) -> list[tuple[int, int, int, int]]:
    cells = []
    for y1, y2 in _partition(rng, side, int(rng.integers(params.min_cells, params.max_cells + 1))):
        for x1, x2 in _partition(rng, side, int(rng.integers(params.min_cells, params.max_cells + 1))):
            cells.append((x1, y1, x2, y2))
    return cells


def _tile(photo: Image.Image, width: int, height: int, min_crop: float, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` with the tile's aspect ratio, resized to the tile, flipped half the time."""
    aspect = width / height
    if photo.width / photo.height > aspect:
        crop_h, crop_w = photo.height, photo.height * aspect
    else:
        crop_w, crop_h = photo.width, photo.width / aspect
    scale = rng.uniform(min_crop, 1.0)
    crop_w, crop_h = crop_w * scale, crop_h * scale
    left, top = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
    tile = photo.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    return tile.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else tile


def _fits(top: np.ndarray, visible: list[int], areas: list[int], box: tuple[int, int, int, int],
          max_occlusion: float) -> bool:
    """Whether pasting ``box`` leaves every earlier object at least (1 - max_occlusion) of its area visible."""
    x1, y1, x2, y2 = box
    covered = np.bincount(top[y1:y2, x1:x2].ravel() + 1, minlength=len(areas) + 1)[1:]
    return all(v - c >= (1 - max_occlusion) * a - 1e-9 for v, c, a in zip(visible, covered, areas))


def _render(composite: _Composite, sources: list[_Source], background_pool: np.ndarray, flowers_root: Path,
            params: ClutterParams, rng: np.random.Generator) -> Image.Image:
    side = params.canvas
    canvas = Image.new("RGB", (side, side))
    cells = _mosaic_cells(rng, side, params)
    composite.background = [int(i) for i in rng.choice(background_pool, len(cells))]
    for (x1, y1, x2, y2), index in zip(cells, composite.background):
        photo = load_image(flowers_root / sources[index].file)
        canvas.paste(_tile(photo, x2 - x1, y2 - y1, params.min_tile_crop, rng), (x1, y1))
    top = np.full((side, side), -1, dtype=np.int16)  # index (into composite.placed) of the object on top
    visible: list[int] = []
    areas: list[int] = []
    for index in composite.objects:
        photo = load_image(flowers_root / sources[index].file)
        longer = max(1, round(rng.uniform(params.min_scale, params.max_scale) * side))
        if photo.width >= photo.height:
            width, height = longer, max(1, round(longer * photo.height / photo.width))
        else:
            width, height = max(1, round(longer * photo.width / photo.height)), longer
        for _ in range(params.placement_tries):
            x, y = int(rng.integers(0, side - width + 1)), int(rng.integers(0, side - height + 1))
            box = (x, y, x + width, y + height)
            if _fits(top, visible, areas, box, params.max_occlusion):
                break
        else:
            log.debug("%s: no place for %s after %d tries; left out", composite.file, sources[index].file,
                      params.placement_tries)
            continue
        covered = np.bincount(top[y:y + height, x:x + width].ravel() + 1, minlength=len(areas) + 1)[1:]
        visible = [v - int(c) for v, c in zip(visible, covered)] + [width * height]
        areas.append(width * height)
        top[y:y + height, x:x + width] = len(composite.placed)
        canvas.paste(photo.resize((width, height), Image.LANCZOS), (x, y))
        composite.placed.append((index, box))
    return canvas


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _build_into(folder: Path, flowers_root: Path, sources: list[_Source], identity: dict, seed: int,
                params: ClutterParams, progress: bool) -> None:
    query_ids = _choose_queries(sources, params.queries_per_class, np.random.default_rng([seed, 0]))
    excluded = set(query_ids)
    test_pool = [i for i, s in enumerate(sources) if s.split == "test" and i not in excluded]
    train_pool = [i for i, s in enumerate(sources) if s.split == "train"]
    train_classes = np.asarray([sources[i].class_id for i in train_pool])
    plans = (_plan("test", params.test_composites, test_pool, params, np.random.default_rng([seed, 1]))
             + _plan("train", params.train_composites, train_pool, params, np.random.default_rng([seed, 2])))

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
    all_train = np.asarray(train_pool)
    with tqdm(total=len(plans), desc="clutter composites", unit="img", dynamic_ncols=True, mininterval=0.5,
              disable=None if progress else True) as bar:
        for n, composite in enumerate(plans):
            split_code = SPLITS.index(composite.split)
            index = n if split_code == 0 else n - params.test_composites
            if composite.split == "test":
                pool = all_train
            else:  # clutter from train photos of other classes than the pasted objects'
                object_classes = [sources[i].class_id for i in composite.objects]
                pool = all_train[~np.isin(train_classes, object_classes)]
                if not len(pool):
                    raise ClutterError(f"no train photos of other classes than {object_classes} for the "
                                       "background of a train composite (too few train classes)")
            image = _render(composite, sources, pool, flowers_root, params,
                            np.random.default_rng([seed, 3 + split_code, index]))
            image.save(folder / composite.file, format="JPEG", quality=params.jpeg_quality)
            bar.update()

    side = params.canvas
    image_rows, box_rows, source_rows = [], [], []
    for composite in plans:
        placed_classes = [sources[i].class_id for i, _ in composite.placed]
        image_rows.append({"file": composite.file, "split": composite.split,
                           "class_ids": " ".join(str(c) for c in placed_classes)})
        for order, (i, box) in enumerate(composite.placed):
            corners = {k: f"{v / side:.6f}" for k, v in zip(("x1", "y1", "x2", "y2"), box)}
            box_rows.append({"file": composite.file, **corners, "class_id": sources[i].class_id,
                             "split": composite.split})
            source_rows.append({"file": composite.file, "role": "object", "order": order,
                                "source": sources[i].file, "class_id": sources[i].class_id})
        for order, i in enumerate(composite.background):
            source_rows.append({"file": composite.file, "role": "background", "order": order,
                                "source": sources[i].file, "class_id": sources[i].class_id})
    _write_csv(folder / "queries.csv", QUERY_COLUMNS, query_rows)
    _write_csv(folder / "images.csv", IMAGE_COLUMNS, image_rows)
    _write_csv(folder / "boxes.csv", BOX_COLUMNS, box_rows)
    _write_csv(folder / "sources.csv", SOURCE_COLUMNS, source_rows)
    counts = {"queries": len(query_rows), "query_classes": len({r["class_id"] for r in query_rows}),
              "test_composites": sum(c.split == "test" for c in plans),
              "train_composites": sum(c.split == "train" for c in plans),
              "test_objects": sum(len(c.placed) for c in plans if c.split == "test"),
              "train_objects": sum(len(c.placed) for c in plans if c.split == "train"),
              "objects_left_out": sum(len(c.objects) - len(c.placed) for c in plans)}
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the Flowers-102 clutter retrieval set.")
    parser.add_argument("flowers_root", help="folder with labels.csv and images/ (DATA_ROOT/flowers102)")
    parser.add_argument("out_dir", help="output folder (default layout: DATA_ROOT/flowers102-clutter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=ClutterParams.test_composites, help="test composites")
    parser.add_argument("--train", type=int, default=ClutterParams.train_composites, help="train composites")
    parser.add_argument("--canvas", type=int, default=ClutterParams.canvas, help="composite side, pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace a set built with other parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    params = ClutterParams(canvas=args.canvas, test_composites=args.test, train_composites=args.train)
    try:
        build_clutter_set(args.flowers_root, args.out_dir, seed=args.seed, params=params, overwrite=args.overwrite)
    except ClutterError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
