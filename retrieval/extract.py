"""Batched descriptor extraction with DataLoader workers, a progress bar and an on-disk cache.

Images keep their aspect ratio, so a batch may only hold images of one output size: with ``batch_size`` > 1
the images are grouped by their resized size (read from the file headers) and each group is batched.
"""
from __future__ import annotations

import hashlib
import json
import re
import logging
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from data.datasets import ImageDataset, box_pixels
from data.images import image_size

from models.backbones import Backbone
from utils.errors import UserError

from .methods import RetrievalMethod

log = logging.getLogger(__name__)

ROLES = ("query", "database")


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images resize to the same (width, height) (any hashable key per index)."""

    def __init__(self, sizes: list[Hashable], batch_size: int):
        buckets: dict[Hashable, list[int]] = defaultdict(list)
        for index, size in enumerate(sizes):
            buckets[size].append(index)
        self.batches = [members[i:i + batch_size] for members in buckets.values()
                        for i in range(0, len(members), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def output_sizes(dataset: ImageDataset) -> list[tuple[int, int]]:
    """Resized (width, height) of every image, from headers (and boxes) without decoding pixels."""
    sizes = []
    for i, path in enumerate(dataset.paths):
        width, height = image_size(path)
        box = dataset.boxes[i] if dataset.boxes is not None else None
        if box is not None:  # the size of the crop the dataset will take (same rounding, same error)
            left, top, right, bottom = box_pixels(box, width, height, path)
            width, height = right - left, bottom - top
        sizes.append(dataset.transform.output_size(width, height))
    return sizes


@dataclass
class Extraction:
    descriptors: np.ndarray
    images_per_second: float
    from_cache: bool = False


@torch.no_grad()
def extract(method: RetrievalMethod, dataset: ImageDataset, batch_size: int = 1, num_workers: int = 0,
            device: str = "cpu", description: str = "extract", channels_last: bool = True,
            role: str = "query") -> Extraction:
    """Encode every image of ``dataset`` in order; returns (N, D) descriptors."""
    return extract_together([method], dataset, batch_size, num_workers, device, description, channels_last,
                            role)[0]


@torch.no_grad()
def extract_together(methods: list[RetrievalMethod], dataset: ImageDataset, batch_size: int = 1,
                     num_workers: int = 0, device: str = "cpu", description: str = "extract",
                     channels_last: bool = True, role: str = "query") -> list[Extraction]:
    """Encode the dataset with several methods in one pass over the images, as queries (``encode``) or as
    the database (``role="database"``: ``encode_database``).

    Images are decoded once, and methods that share a backbone object run it once per batch
    (:meth:`Backbone.reuse_forward`). The reported images/s is that of the whole pass. ``channels_last``
    runs the networks in NHWC memory layout (2-2.5x faster convolutions on CPU; same values up to float
    rounding).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    encoders = [m.encode_database if role == "database" else m.encode for m in methods]
    for method in methods:
        method.eval().to(device, memory_format=layout)
    if batch_size > 1:
        loader = DataLoader(dataset, batch_sampler=SizeBucketBatchSampler(output_sizes(dataset), batch_size),
                            num_workers=num_workers)
    else:
        loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    backbones = {id(b): b for m in methods for b in m.modules() if isinstance(b, Backbone)}
    outputs: list[np.ndarray | None] = [None] * len(methods)
    start = time.perf_counter()
    with ExitStack() as stack, tqdm(total=len(dataset), desc=description, unit="img", dynamic_ncols=True,
                                    leave=False, disable=None) as bar:
        if len(methods) > 1:
            for backbone in backbones.values():
                stack.enter_context(backbone.reuse_forward())
        for images, indices in loader:
            images = images.to(device).contiguous(memory_format=layout)
            for i, encode in enumerate(encoders):
                encoded = encode(images).cpu().numpy()
                if outputs[i] is None:
                    outputs[i] = np.empty((len(dataset), *encoded.shape[1:]), dtype=encoded.dtype)
                outputs[i][indices.numpy()] = encoded
            bar.update(len(indices))
    elapsed = time.perf_counter() - start
    if outputs[0] is None:
        raise UserError(f"{description}: the dataset is empty")
    return [Extraction(output, len(dataset) / max(elapsed, 1e-9)) for output in outputs]


def safe_name(text: str) -> str:
    """A file-name-safe version of a benchmark or method name (``run:runs/x`` -> ``run_runs_x``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unnamed"


class DescriptorCache:
    """Descriptors on disk, keyed by the method's config, the weights and the benchmark/transform."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    @staticmethod
    def key(*parts) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _paths(self, benchmark: str, method: str, key: str) -> tuple[Path, Path]:
        folder = self.root / safe_name(benchmark)
        stem = f"{safe_name(method)}-{key}"
        return folder / f"{stem}.npy", folder / f"{stem}.json"

    def load(self, benchmark: str, method: str, key: str, count: int) -> Extraction | None:
        if self.root is None:
            return None
        array_path, meta_path = self._paths(benchmark, method, key)
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            descriptors = np.load(array_path)
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable cache entry %s (%s)", array_path, error)
            return None
        if len(descriptors) != count:
            log.warning("ignoring cache entry %s: %d descriptors for %d images", array_path, len(descriptors), count)
            return None
        log.info("descriptors of %s on %s from cache %s", method, benchmark, array_path)
        return Extraction(descriptors, float(meta["images_per_second"]), from_cache=True)

    def save(self, benchmark: str, method: str, key: str, extraction: Extraction, config: dict) -> None:
        if self.root is None:
            return
        array_path, meta_path = self._paths(benchmark, method, key)
        array_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(array_path, extraction.descriptors)
        meta_path.write_text(json.dumps({"config": config, "images_per_second": extraction.images_per_second,
                                         "count": len(extraction.descriptors)}, indent=2, default=str))
