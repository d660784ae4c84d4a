"""Batched descriptor extraction with DataLoader workers and a progress bar: into memory, or shard by shard
to disk.

Images keep their aspect ratio, so a batch may only hold images of one output size: with ``batch_size`` > 1
the images are grouped by their resized size (read from the file headers) and each group is batched.

:func:`extract_together` returns every descriptor in memory (training descriptors, small sets).
:func:`extract_shards` encodes chosen shards of consecutive images (:mod:`retrieval.search.shards`), size-bucketed
within each shard, and writes each finished shard to disk: memory holds one shard, a restarted extraction
skips the shards already written, and several processes can each take their own shards. A shard's batches
depend only on its images, so its descriptors are the same whichever process (or how many) extracts it.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from msretrieval.data.datasets import ImageDataset, box_pixels
from msretrieval.data.images import image_size
from msretrieval.data.transforms import EvalTransform

from msretrieval.models.backbones import Backbone
from msretrieval.retrieval.search.shards import ShardWriter
from msretrieval.utils.errors import UserError

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


def output_sizes(dataset: ImageDataset, indices: Iterable[int] | None = None) -> list[tuple[int, int]]:
    """Resized (width, height) of every image (or of images ``indices``), from headers (and boxes) without
    decoding pixels: exactly the sizes :class:`ImageDataset` gives (a crop at its full image's scale)."""
    sizes = []
    for i in range(len(dataset.paths)) if indices is None else indices:
        path = dataset.paths[i]
        width, height = image_size(path)
        box = dataset.boxes[i] if dataset.boxes is not None else None
        if box is None:
            sizes.append(dataset.transform.output_size(width, height))
            continue
        # the size of the crop the dataset will take (same rounding, same error), at its full image's scale
        left, top, right, bottom = box_pixels(box, width, height, path)
        sizes.append(dataset.transform.output_size(right - left, bottom - top, full_size=(width, height)))
    return sizes


@dataclass
class Extraction:
    descriptors: np.ndarray  # (N, ...) rows; a memory map when read from a cache entry
    images_per_second: float  # over the images extracted in the run that made them (NaN: none were)
    from_cache: bool = False
    fitted_state: str | None = None  # the method's fit that made them (cache entries record it)


@torch.no_grad()
def extract(method: RetrievalMethod, dataset: ImageDataset, batch_size: int = 1, num_workers: int = 0,
            device: str = "cpu", description: str = "extract", channels_last: bool = True,
            role: str = "query") -> Extraction:
    """Encode every image of ``dataset`` in order; returns (N, D) descriptors."""
    return extract_together([method], dataset, batch_size, num_workers, device, description, channels_last,
                            role)[0]


@contextmanager
def _encoders(methods: list[RetrievalMethod], device: str, channels_last: bool, role: str):
    """Methods ready to encode on ``device`` (eval mode, memory layout, one forward per shared backbone);
    yields (their encode functions, the memory layout, a function to call after each batch)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for method in methods:
        method.eval().to(device, memory_format=layout)
    backbones = {id(b): b for m in methods for b in m.modules() if isinstance(b, Backbone)}
    with ExitStack() as stack:
        if len(methods) > 1:
            for backbone in backbones.values():
                stack.enter_context(backbone.reuse_forward())

        def forget_batch() -> None:  # every method has seen the batch: shared backbones drop its feature maps
            for backbone in backbones.values():
                backbone.next_batch()

        yield [m.encode_database if role == "database" else m.encode for m in methods], layout, forget_batch


class _Pixels(Dataset):
    """Images ``rows`` of an :class:`ImageDataset` with an :class:`EvalTransform`, as ``(uint8 pixels, index)``:
    the transform without its normalisation, which then runs once per stacked batch (no float copy per image,
    no stack of floats, no layout copy: the batch comes out channels-last; on a GPU a quarter of the bytes
    cross the bus). The values are those of the whole transform to the bit."""

    def __init__(self, dataset: ImageDataset, rows: range):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        index = self.rows[position]
        return self.dataset.transform.pixels(self.dataset.load(index), self.dataset.full_size(index)), index


def _encode_rows(encoders: list, dataset: ImageDataset, rows: range, batch_size: int, num_workers: int,
                 device: str, layout, bar, forget_batch) -> list[np.ndarray]:
    """Descriptors of images ``rows`` of the dataset, one (len(rows), ...) array per encoder."""
    transform = getattr(dataset, "transform", None)
    # (a subclass with its own __getitem__ gets its items as it makes them)
    batch_normalize = (isinstance(dataset, ImageDataset) and type(dataset).__getitem__ is ImageDataset.__getitem__
                       and isinstance(transform, EvalTransform))
    if batch_normalize:  # uint8 pixels are collated and normalised a whole batch at a time, on the device
        part = _Pixels(dataset, rows)
    else:
        part = dataset if rows == range(len(dataset)) else Subset(dataset, rows)
    if batch_size > 1:
        loader = DataLoader(part, batch_sampler=SizeBucketBatchSampler(output_sizes(dataset, rows), batch_size),
                            num_workers=num_workers)
    else:
        loader = DataLoader(part, batch_size=1, num_workers=num_workers)
    outputs: list[np.ndarray | None] = [None] * len(encoders)
    for images, indices in loader:  # indices are the dataset's
        images = images.to(device)
        if batch_normalize:
            images = transform.normalize(images)
        images = images.contiguous(memory_format=layout)
        places = indices.numpy() - rows.start
        for i, encode in enumerate(encoders):
            encoded = encode(images).cpu().numpy()
            if outputs[i] is None:
                outputs[i] = np.empty((len(rows), *encoded.shape[1:]), dtype=encoded.dtype)
            outputs[i][places] = encoded
        forget_batch()
        bar.update(len(indices))
    return outputs


def _progress(total: int, description: str):
    return tqdm(total=total, desc=description, unit="img", dynamic_ncols=True, leave=False, disable=None)


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
    if len(dataset) == 0:
        raise UserError(f"{description}: the dataset is empty")
    start = time.perf_counter()
    with _encoders(methods, device, channels_last, role) as (encoders, layout, forget_batch), \
            _progress(len(dataset), description) as bar:
        outputs = _encode_rows(encoders, dataset, range(len(dataset)), batch_size, num_workers, device, layout, bar,
                               forget_batch)
    elapsed = time.perf_counter() - start
    return [Extraction(output, len(dataset) / max(elapsed, 1e-9)) for output in outputs]


@torch.no_grad()
def extract_shards(methods: list[RetrievalMethod], dataset: ImageDataset, writers: list[ShardWriter],
                   shards: Iterable[int], batch_size: int = 1, num_workers: int = 0, device: str = "cpu",
                   description: str = "extract", channels_last: bool = True, role: str = "query") -> int:
    """Encode shards ``shards`` of the dataset (rows ``writers[i].ranges[shard]``) and write each finished
    shard with ``writers[i]``, for every method ``methods[i]`` whose writer does not hold it yet (one pass over
    the images, as :func:`extract_together`). Returns the number of images encoded."""
    if len(dataset) == 0:
        raise UserError(f"{description}: the dataset is empty")
    todo = {s: [i for i, writer in enumerate(writers) if not writer.done(s)] for s in shards}
    todo = {s: members for s, members in todo.items() if members}
    ranges = writers[0].ranges
    total = sum(len(ranges[s]) for s in todo)
    with _encoders(methods, device, channels_last, role) as (encoders, layout, forget_batch), \
            _progress(total, description) as bar:
        for shard, members in todo.items():
            outputs = _encode_rows([encoders[i] for i in members], dataset, ranges[shard], batch_size,
                                   num_workers, device, layout, bar, forget_batch)
            for i, rows in zip(members, outputs):
                writers[i].write(shard, rows)
    return total


