"""Google Landmarks Dataset v2 (GLDv2) training manifests as a :class:`LabelledImageSet`.

Two CSV formats are read, both with images at ``<csv folder>/train/a/b/c/abc....jpg`` (the first three
characters of the image id as folders):

* ``train.csv``: one row per image, columns ``id`` and ``landmark_id`` (the official file also has ``url``);
* ``train_clean.csv``: one row per landmark, columns ``landmark_id`` and ``images`` (space-separated ids).

Landmark ids are sparse and large, so labels are remapped to 0..C-1 in ascending landmark-id order; the
original id of every image stays in ``extra["landmark_id"]`` (and its image id in ``extra["image_id"]``).
Image files are not checked here (millions of stat calls); a missing file fails in ``load_image``.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np

from .manifest import LabelledImageSet, ManifestError

logger = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"[0-9A-Za-z]{3,}")
PER_IMAGE_COLUMNS = ("id", "landmark_id")
PER_LANDMARK_COLUMNS = ("landmark_id", "images")


def gldv2_image_path(root: str | Path, image_id: str, image_folder: str = "train") -> Path:
    """``root/train/a/b/c/abc....jpg`` for image id ``abc...``."""
    return Path(root) / image_folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _landmark(value: str | None, csv_path: Path, line: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{csv_path}:{line}: landmark_id {value!r} is not an integer") from None


def _image_id(value: str | None, csv_path: Path, line: int) -> str:
    # Ids become folder names: anything but letters and digits could escape the image folder.
    if value is None or not IMAGE_ID.fullmatch(value.strip()):
        raise ManifestError(f"{csv_path}:{line}: image id {value!r} is not >= 3 letters/digits")
    return value.strip()


def read_gldv2_pairs(csv_path: str | Path) -> list[tuple[str, int]]:
    """(image id, landmark id) for every image of either CSV format, in file order."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"GLDv2 manifest not found: {csv_path}")
    pairs = []
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        per_image = all(c in columns for c in PER_IMAGE_COLUMNS)
        per_landmark = all(c in columns for c in PER_LANDMARK_COLUMNS)
        if not (per_image or per_landmark):
            raise ManifestError(f"{csv_path}: expected columns {list(PER_IMAGE_COLUMNS)} (train.csv) or "
                                f"{list(PER_LANDMARK_COLUMNS)} (train_clean.csv); found {columns}")
        for line, row in enumerate(reader, start=2):
            if None in row or any(row.get(c) is None for c in columns):
                raise ManifestError(f"{csv_path}:{line}: expected {len(columns)} fields, got a different count")
            landmark = _landmark(row["landmark_id"], csv_path, line)
            if per_image:
                pairs.append((_image_id(row["id"], csv_path, line), landmark))
                continue
            ids = row["images"].split()
            if not ids:
                raise ManifestError(f"{csv_path}:{line}: landmark {landmark} lists no images")
            pairs.extend((_image_id(i, csv_path, line), landmark) for i in ids)
    if not pairs:
        raise ManifestError(f"{csv_path}: the manifest has no images")
    # An image listed twice would be sampled twice as often, or be its own negative under two labels.
    seen: dict[str, int] = {}
    for image_id, landmark in pairs:
        if image_id in seen:
            raise ManifestError(f"{csv_path}: image {image_id} is listed twice (landmarks {seen[image_id]} "
                                f"and {landmark})")
        seen[image_id] = landmark
    return pairs


def select_landmarks(counts: dict[int, int], min_images_per_class: int, max_classes: int | None) -> list[int]:
    """Landmarks with >= ``min_images_per_class`` images; at most ``max_classes`` of them, the largest
    first (ties: smaller landmark id), returned in ascending landmark-id order."""
    kept = [landmark for landmark, n in counts.items() if n >= min_images_per_class]
    if max_classes is not None:
        kept = sorted(kept, key=lambda landmark: (-counts[landmark], landmark))[:max_classes]
    return sorted(kept)


def read_gldv2(csv_path: str | Path, min_images_per_class: int = 1, max_classes: int | None = None,
               image_folder: str = "train", name: str | None = None) -> LabelledImageSet:
    """GLDv2 training images of the landmarks kept by :func:`select_landmarks`, labels 0..C-1."""
    if min_images_per_class < 1:
        raise ValueError(f"min_images_per_class must be >= 1, got {min_images_per_class}")
    if max_classes is not None and max_classes < 1:
        raise ValueError(f"max_classes must be >= 1 or None, got {max_classes}")
    csv_path = Path(csv_path)
    pairs = read_gldv2_pairs(csv_path)
    landmark_of_image = np.fromiter((landmark for _, landmark in pairs), dtype=np.int64, count=len(pairs))
    landmarks, counts = np.unique(landmark_of_image, return_counts=True)
    kept = select_landmarks(dict(zip(landmarks.tolist(), counts.tolist())), min_images_per_class, max_classes)
    if not kept:
        raise ManifestError(f"{csv_path}: no landmark has >= {min_images_per_class} images")
    kept = np.asarray(kept, dtype=np.int64)
    rows = np.flatnonzero(np.isin(landmark_of_image, kept))
    labels = np.searchsorted(kept, landmark_of_image[rows])
    root = csv_path.parent
    logger.info("%s: %d of %d landmarks kept (>= %d images%s), %d of %d images", csv_path, len(kept),
                len(landmarks), min_images_per_class, f", largest {max_classes}" if max_classes else "",
                len(rows), len(pairs))
    return LabelledImageSet(
        name=name or f"gldv2-{csv_path.stem}",
        paths=tuple(gldv2_image_path(root, pairs[r][0], image_folder) for r in rows),
        labels=labels.astype(np.int64),
        extra={"image_id": tuple(pairs[r][0] for r in rows),
               "landmark_id": tuple(str(pairs[r][1]) for r in rows)},
    )


def landmark_ids(image_set: LabelledImageSet) -> np.ndarray:
    """Original landmark id of each label 0..C-1 (from ``extra["landmark_id"]``)."""
    if "landmark_id" not in image_set.extra:
        raise ValueError(f"{image_set.name} has no landmark_id column")
    mapping = np.full(int(image_set.labels.max()) + 1, -1, dtype=np.int64)
    mapping[image_set.labels] = np.asarray(image_set.extra["landmark_id"], dtype=np.int64)
    return mapping
