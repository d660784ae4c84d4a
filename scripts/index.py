#!/usr/bin/env python
"""Index a folder of images with a released model (FAISS, written to disk; reloaded without re-extracting).

    python scripts/index.py releases/flowers102 photos/ --out indexes/photos
    python scripts/index.py releases/flowers102 photos/ --out indexes/photos       # again: only new images
    python scripts/index.py releases/flowers102 photos/ --out indexes/ivf --factory IVF64,Flat
    python scripts/index.py releases/flowers102 photos/ --out indexes/big --factory auto   # chosen by size
    python scripts/index.py releases/hash64 photos/ --out indexes/codes --keep-floats  # for search.py --rerank

Run again on the same folder and index directory to add the images that are new (or changed) since and to
drop the removed ones; only those are decoded. Then search it with scripts/search.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

from msretrieval.release import load_release
from msretrieval.release.image_index import ImageIndex
from msretrieval.utils.cli import run_cli

log = logging.getLogger("index")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release", help="a release directory (scripts/export.py) or a training .pth")
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="index directory (created, or updated if it exists)")
    parser.add_argument("--factory", default="Flat",
                        help="FAISS index factory string, inner-product metric (default Flat: exact search), or "
                             "auto: exact up to 200,000 images, then IVF-PQ (binary IVF for a hashing release), "
                             "with the parameters recorded in INDEX/index.json")
    parser.add_argument("--keep-floats", action="store_true",
                        help="hashing release: also keep the float descriptors the codes come from (INDEX/floats.npy, "
                             "4 bytes a dimension an image, on disk) for two-stage search (scripts/search.py --rerank)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    retriever = load_release(args.release, device=args.device)
    index, update = ImageIndex.update(args.out, args.folder, retriever, args.release, factory=args.factory,
                                      batch_size=args.batch_size, keep_floats=args.keep_floats)
    rate = update.added / update.encode_seconds if update.added else 0.0
    print(f"index {args.out}: {len(index.paths)} images ({update.added} added, {update.kept} unchanged, "
          f"{update.removed} removed); {update.total_seconds:.1f} s, encoding {rate:.1f} img/s")
    return 0


def cli() -> int:
    """Console entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
