"""Box annotations for training the landmark detector, read from a CSV in one of two layouts.

**Our layout** (one row per box; what the composite generator writes as ``boxes.csv``)::

    file,x1,y1,x2,y2,class_id,split
    images/000001.jpg,0.12,0.30,0.45,0.71,1,train

Coordinates are normalised to [0, 1] (x to the right, y down; ``x1 < x2``, ``y1 < y2``); ``file`` is relative
to the CSV's folder (or ``image_root`` when given; absolute paths stay). ``class_id`` (optional, default 1)
is kept but the detector is class-agnostic. ``split`` (optional, default ``default_split``) is any word;
the trainer uses ``train`` and ``test``. A row whose four coordinates are all empty lists an image without
any box (a negative). Values a hair outside [0, 1] (up to 1e-3, rounding) are clipped; anything else wrong
is an error naming the CSV, the line and the file.

**Google-Landmarks boxes layout** (the "Google Landmark Boxes" of Detect-to-Retrieve, published with the
Google-Landmarks v1 Kaggle data set as ``boxes_split1.csv`` (train, ~54k rows) and ``boxes_split2.csv``
(validation, ~32k rows))::

    id,box
    0123456789abcdef,0.1 0.2 0.8 0.9

``box`` is space-separated normalised ``ymin xmin ymax xmax`` (top, left, bottom, right), read here as one or
more groups of four (an empty ``box`` = an image without box); an id on several rows collects their boxes.
The mapping ``ymin xmin ymax xmax -> x1 = xmin, y1 = ymin, x2 = xmax, y2 = ymax`` follows third-party
loaders of these files and a data-set description (the official Kaggle page could not be read from this
machine): **check a few boxes visually before training on them**. The files have no split column: every row
gets ``default_split`` (pass ``boxes_split2.csv`` as the test file of the trainer). Image path of an id:
``ROOT/<id>.jpg`` (the flat folder the Kaggle downloader script writes) if it exists, else the GLDv2-style
``ROOT/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``; ``ROOT`` = ``image_root``, default the CSV's folder.
"""
from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .gldv2 import IMAGE_ID, gldv2_image_path
from .manifest import ManifestError

log = logging.getLogger(__name__)

OUR_COLUMNS = ("file", "x1", "y1", "x2", "y2")
GLD_COLUMNS = ("id", "box")
CLIP_TOLERANCE = 1e-3


class BoxCSVError(ManifestError):
    """A box CSV is missing or malformed; the message names the file, the line and the image."""


@dataclass
class BoxImage:
    """One image and all its boxes: (n, 4) float32 normalised [x1, y1, x2, y2], (n,) int64 class ids."""

    path: Path
    split: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    source: str = ""  # "csv:line" of its first row, for messages


def finite_number(value: str, name: str, where: str, error: type[Exception] = BoxCSVError) -> float:
    """``value`` as a finite float, else ``error("WHERE: NAME 'VALUE' is not a number / not finite")``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{where}: {name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise error(f"{where}: {name} {value!r} is not finite")
    return number


def _check_box(x1: float, y1: float, x2: float, y2: float, where: str) -> list[float]:
    for name, value in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
        if not -CLIP_TOLERANCE <= value <= 1 + CLIP_TOLERANCE:
            raise BoxCSVError(f"{where}: {name} = {value} is outside [0, 1] (coordinates must be normalised)")
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        raise BoxCSVError(f"{where}: empty box (need x1 < x2 and y1 < y2, got x1={x1}, y1={y1}, x2={x2}, y2={y2})")
    return [x1, y1, x2, y2]


class _Collector:
    """Rows -> BoxImage per path, in first-seen order; a path listed under two splits is an error."""

    def __init__(self):
        self.images: dict[Path, BoxImage] = {}
        self.boxes: dict[Path, list] = defaultdict(list)
        self.classes: dict[Path, list] = defaultdict(list)

    def add(self, path: Path, split: str, where: str, box: list[float] | None, class_id: int = 1) -> None:
        image = self.images.get(path)
        if image is None:
            self.images[path] = BoxImage(path=path, split=split, source=where)
        elif image.split != split:
            raise BoxCSVError(f"{where}: {path.name} is in split {split!r} here but {image.split!r} at {image.source}")
        if box is not None:
            self.boxes[path].append(box)
            self.classes[path].append(class_id)

    def result(self) -> list[BoxImage]:
        for path, image in self.images.items():
            if self.boxes[path]:
                image.boxes = np.asarray(self.boxes[path], dtype=np.float32)
                image.class_ids = np.asarray(self.classes[path], dtype=np.int64)
        return list(self.images.values())


def _read_ours(reader, csv_path: Path, root: Path, default_split: str) -> list[BoxImage]:
    collector = _Collector()
    for line, row in enumerate(reader, start=2):
        file = (row.get("file") or "").strip()
        where = f"{csv_path}:{line} ({file or 'no file'})"
        if not file:
            raise BoxCSVError(f"{where}: empty file name")
        values = [(row.get(k) or "").strip() for k in ("x1", "y1", "x2", "y2")]
        if None in row:  # more cells than header columns
            raise BoxCSVError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
        if all(v == "" for v in values):
            box = None
        elif any(v == "" for v in values):
            raise BoxCSVError(f"{where}: some coordinates are empty (leave all four empty for an image without boxes)")
        else:
            box = _check_box(*(finite_number(v, k, where) for v, k in zip(values, ("x1", "y1", "x2", "y2"))), where)
        class_text = (row.get("class_id") or "").strip()
        try:
            class_id = int(class_text) if class_text else 1
        except ValueError:
            raise BoxCSVError(f"{where}: class_id {class_text!r} is not an integer") from None
        split = (row.get("split") or "").strip().lower() or default_split
        path = Path(file)
        collector.add(path if path.is_absolute() else root / path, split, where, box, class_id)
    return collector.result()


def gld_image_path(root: Path, image_id: str) -> Path:
    flat = root / f"{image_id}.jpg"
    if flat.is_file():
        return flat
    nested = gldv2_image_path(root, image_id, image_folder="")
    return nested if nested.is_file() else flat


def _read_gld(reader, csv_path: Path, root: Path, default_split: str) -> list[BoxImage]:
    collector = _Collector()
    for line, row in enumerate(reader, start=2):
        image_id = (row.get("id") or "").strip()
        where = f"{csv_path}:{line} (id {image_id or 'missing'})"
        if not IMAGE_ID.fullmatch(image_id):
            raise BoxCSVError(f"{where}: image id {image_id!r} is not >= 3 letters/digits")
        numbers = (row.get("box") or "").split()
        if len(numbers) % 4:
            raise BoxCSVError(f"{where}: box has {len(numbers)} numbers, not groups of 4 (ymin xmin ymax xmax)")
        path = gld_image_path(root, image_id)
        if not numbers:
            collector.add(path, default_split, where, None)
        for start in range(0, len(numbers), 4):
            ymin, xmin, ymax, xmax = (finite_number(v, k, where) for v, k in
                                      zip(numbers[start:start + 4], ("ymin", "xmin", "ymax", "xmax")))
            collector.add(path, default_split, where, _check_box(xmin, ymin, xmax, ymax, where))
    return collector.result()


def read_box_csv(csv_path: str | Path, image_root: str | Path | None = None, default_split: str = "train",
                 check_files: bool = True, skip_missing: bool = False) -> list[BoxImage]:
    """All images of a box CSV (either layout, told apart by the header) with their boxes.

    ``check_files``: missing images are an error naming the first few (``skip_missing``: dropped with a
    warning instead; Google-Landmarks downloads usually miss some)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BoxCSVError(f"box CSV not found: {csv_path}")
    root = Path(image_root) if image_root is not None else csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        if all(c in columns for c in OUR_COLUMNS):
            images = _read_ours(reader, csv_path, root, default_split)
        elif all(c in columns for c in GLD_COLUMNS):
            images = _read_gld(reader, csv_path, root, default_split)
        else:
            raise BoxCSVError(f"{csv_path}: unknown box CSV layout (columns {columns}); expected "
                              f"{','.join(OUR_COLUMNS)}[,class_id][,split] or {','.join(GLD_COLUMNS)}")
    if not images:
        raise BoxCSVError(f"{csv_path}: no rows")
    if check_files:
        missing = [image for image in images if not image.path.is_file()]
        if missing and not skip_missing:
            listed = "; ".join(f"{m.path} ({m.source.split(' ')[0]})" for m in missing[:3])
            raise BoxCSVError(f"{csv_path}: {len(missing)} image(s) not found, e.g. {listed}")
        if missing:
            log.warning("%s: %d of %d images not found, skipped", csv_path, len(missing), len(images))
            images = [image for image in images if image.path.is_file()]
    return images
