"""Allocator settings for training and extraction on the CPU.

glibc returns large freed blocks to the operating system at once, so every training step maps its
activation buffers anew and page-faults them in again (gigabytes a step for the main job). Keeping freed
memory for reuse removed that: 1.68 -> 1.24 s per step of the main job on this 2-core machine, with the same
peak memory (the buffers of one step are what is kept).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: oneDNN convolution primitives kept for reuse (its default is 1024). Each input shape gets its own primitives,
#: with their buffers, and evaluation images come in many shapes: with the default, extracting Flowers-102's
#: 4,696 test images grew the process by ~2 GB; with 64, evaluation keeps its speed (batches of one shape run
#: one after another) and 1,500 images peak at 1.44 GB instead of 2.64 GB (docs/training.md, Memory).
PRIMITIVE_CACHE_CAPACITY = 64


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory (fixed 32 MiB mmap threshold, 2 GiB trim threshold).
    Returns False (and changes nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1

    log.debug("malloc keeps freed memory for reuse: %s", ok)
    return ok


def bound_primitive_cache(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache (unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is already set): oneDNN reads the
    variable when it creates its first primitive, so this must run before the first convolution."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (after validation, before the final evaluation:
    the kept training buffers would otherwise count in the peak of what follows). No-op without glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
