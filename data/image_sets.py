"""Labelled image sets named by a spec string, for fitting (``scripts/evaluate.py --fit-on``) and training.

- ``flowers102[:SPLIT]``: ``DATA_ROOT/flowers102/labels.csv``, the ``train`` split unless another is named;
- ``csv:PATH[:SPLIT]``: any manifest (:mod:`data.manifest`), every row unless a split is named;
- ``gldv2:PATH``: a Google Landmarks v2 ``train.csv`` / ``train_clean.csv`` (:mod:`data.gldv2`);
- ``revisitop:NAME``: the database and query images of ``DATA_ROOT/NAME`` labelled by landmark
  (:meth:`data.revisitop.RevisitopSet.labelled_images`; images outside every query's positives get a label
  of their own).
"""
from __future__ import annotations

from pathlib import Path

from msretrieval.utils.errors import UserError

from .manifest import LabelledImageSet, flowers102, read_csv_manifest

SYNTAX = {"flowers102": "flowers102[:SPLIT]", "csv": "csv:PATH[:SPLIT]", "gldv2": "gldv2:PATH",
          "revisitop": "revisitop:NAME"}
KINDS = tuple(SYNTAX)


def load_image_set(spec: str, data_root: str | Path, kinds: tuple[str, ...] = KINDS) -> LabelledImageSet:
    """The labelled set ``spec`` names (see the module docstring); ``kinds`` limits the accepted kinds."""
    kind, _, rest = spec.partition(":")
    if kind not in kinds:
        raise UserError(f"unknown image set {spec!r}; use {', '.join(SYNTAX[k] for k in kinds)}")
    if kind == "flowers102":
        return flowers102(data_root, rest or "train")
    if kind == "csv":
        path, _, split = rest.partition(":")
        return read_csv_manifest(path, split=split or None)
    if kind == "gldv2":
        from .gldv2 import read_gldv2
        return read_gldv2(rest)
    from .revisitop import load_revisitop
    return load_revisitop(data_root, rest).labelled_images()
