"""Labelled image sets described by a CSV manifest.

A manifest has at least the columns ``file`` and ``class_id``; an optional ``split`` column selects subsets
(``train`` / ``test`` for the class-disjoint metric-learning split). File paths are relative to the CSV's
folder. ``flowers102`` is the manifest at ``DATA_ROOT/flowers102/labels.csv``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msretrieval.utils.errors import UserError

REQUIRED_COLUMNS = ("file", "class_id")


class ManifestError(UserError):
    """A manifest is missing, malformed, or selects nothing."""


@dataclass(frozen=True)
class LabelledImageSet:
    """Image paths with integer class labels (and the manifest's other columns)."""

    name: str
    paths: tuple[Path, ...]
    labels: np.ndarray
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))

    def subset(self, indices, name: str | None = None) -> "LabelledImageSet":
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImageSet(
            name=name or self.name,
            paths=tuple(self.paths[i] for i in indices),
            labels=self.labels[indices],
            extra={key: tuple(values[i] for i in indices) for key, values in self.extra.items()},
        )


def read_csv_rows(path: Path, required, error: type[ManifestError] = ManifestError
                  ) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, row)]) of a CSV that must exist and have the ``required`` columns (a byte-order
    mark is ignored; the header is line 1); problems raise ``error`` naming the file."""
    if not path.is_file():
        raise error(f"manifest not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise error(f"{path}: missing column(s) {missing}; found {columns}")
        return list(columns), [(reader.line_num, row) for row in reader]


def read_csv_manifest(csv_path: str | Path, split: str | None = None, name: str | None = None
                      ) -> LabelledImageSet:
    """Read a manifest; ``split`` keeps only rows whose ``split`` column equals it."""
    csv_path = Path(csv_path)
    columns, numbered = read_csv_rows(csv_path, REQUIRED_COLUMNS)
    if split is not None and "split" not in columns:
        raise ManifestError(f"{csv_path}: split {split!r} requested but the manifest has no 'split' column")
    rows = [row for _, row in numbered]
    if split is not None:
        rows = [row for row in rows if row["split"] == split]
        if not rows:
            raise ManifestError(f"{csv_path}: no rows with split == {split!r}")
    if not rows:
        raise ManifestError(f"{csv_path}: the manifest has no rows")
    root = csv_path.parent
    labels = []
    for row in rows:
        try:
            labels.append(int(row["class_id"]))
        except (TypeError, ValueError):
            raise ManifestError(f"{csv_path}: class_id {row['class_id']!r} is not an integer "
                                f"(file {row['file']})") from None
    extra_columns = [c for c in columns if c not in REQUIRED_COLUMNS]
    return LabelledImageSet(
        name=name or csv_path.parent.name + (f"-{split}" if split else ""),
        paths=tuple(root / row["file"] for row in rows),
        labels=np.asarray(labels, dtype=np.int64),
        extra={c: tuple(row[c] for row in rows) for c in extra_columns},
    )


def flowers102(data_root: str | Path, split: str | None = "test") -> LabelledImageSet:
    """Oxford Flowers-102 with the class-disjoint split (``train`` = classes 1-51, ``test`` = 52-102)."""
    return read_csv_manifest(Path(data_root) / "flowers102" / "labels.csv", split=split,
                             name=f"flowers102-{split}" if split else "flowers102")
