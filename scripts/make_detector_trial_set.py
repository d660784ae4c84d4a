#!/usr/bin/env python
"""A small synthetic box set for trying the landmark detector: real Flowers-102 photos pasted on clutter.

    python scripts/make_detector_trial_set.py --out /tmp/composites --train 300 --test 100

Each composite is a SIZE x SIZE canvas (448 by default) whose background is a mosaic of blurred, desaturated
tiles cut from random flower photos plus noise (``--clutter sharp``: sharp full-colour tiles, much harder);
1-3 objects are pasted on it: a random crop (60-100 % of each side) of a flower photo, resized so that its
longer side is 10-40 % of the canvas side, aspect ratio kept, overlapping each other by IoU <= 0.2. Training composites use photos of the Flowers-102 ``train`` classes
(1-51), test composites photos of the ``test`` classes (52-102), so the test objects are unseen flowers.
Writes OUT/images/*.jpg and OUT/boxes.csv in the detector's layout (``file,x1,y1,x2,y2,class_id,split``,
normalised coordinates, one row per box; class_id = the photo's flower class).

This generator exists for the detector's own trial and tests; the project's composite generator (written
separately) produces the same CSV layout and can replace it.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from data.images import load_image  # noqa: E402
from data.roots import resolve_data_root  # noqa: E402
from models.boxes import box_iou  # noqa: E402
from utils.cli import run_cli  # noqa: E402

log = logging.getLogger("make_detector_trial_set")


def background(photos: list[Path], size: int, rng: np.random.Generator, sharp: bool = False) -> Image.Image:
    """A mosaic of tiles cut from random photos: blurred and 60 % desaturated, 24-72 px (``sharp``: tiles
    as they are, full colour, 32-128 px, i.e. as large as the smaller objects: much harder clutter)."""
    canvas = Image.new("RGB", (size, size))
    low, high = (32, 128) if sharp else (24, 72)
    y = 0
    while y < size:
        row = int(rng.integers(low, high))
        x = 0
        while x < size:
            cell = int(rng.integers(low, high))
            photo = load_image(photos[rng.integers(len(photos))])
            w, h = photo.size
            cw, ch = min(w, int(rng.integers(32, 96))), min(h, int(rng.integers(32, 96)))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            tile = photo.crop((left, top, left + cw, top + ch))
            if sharp:
                canvas.paste(tile.resize((cell, row), Image.BILINEAR), (x, y))
            else:
                tile = tile.resize((max(cell // 6, 2), max(row // 6, 2)))
                tile = tile.resize((cell, row), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))
                grey = tile.convert("L").convert("RGB")
                canvas.paste(Image.blend(tile, grey, 0.6), (x, y))
            x += cell
        y += row
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def paste_objects(canvas: Image.Image, photos: list[tuple[Path, int]], rng: np.random.Generator,
                  min_fraction: float, max_fraction: float, max_objects: int) -> list[tuple[list[float], int]]:
    size = canvas.width
    placed: list[tuple[list[float], int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            path, class_id = photos[rng.integers(len(photos))]
            photo = load_image(path)
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = photo.crop((left, top, left + cw, top + ch))
            longer = rng.uniform(min_fraction, max_fraction) * size
            scale = longer / max(cw, ch)
            ow, oh = max(8, round(cw * scale)), max(8, round(ch * scale))
            x, y = int(rng.integers(0, size - ow + 1)), int(rng.integers(0, size - oh + 1))
            box = [x / size, y / size, (x + ow) / size, (y + oh) / size]
            if placed and box_iou([box], [b for b, _ in placed]).max() > 0.2:
                continue
            canvas.paste(crop.resize((ow, oh), Image.BICUBIC), (x, y))
            placed.append((box, class_id))
            break
    return placed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (images/ and boxes.csv)")
    parser.add_argument("--data-root", default=None, help="holds flowers102/ (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--train", type=int, default=300, help="training composites")
    parser.add_argument("--test", type=int, default=100, help="test composites (unseen flower classes)")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--min-fraction", type=float, default=0.1, help="smallest object side / canvas side")
    parser.add_argument("--max-fraction", type=float, default=0.4, help="largest object side / canvas side")
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--clutter", choices=["blurred", "sharp"], default="blurred",
                        help="background tiles: blurred + desaturated (default) or sharp full-colour photo tiles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = resolve_data_root(args.data_root) / "flowers102"
    with (root / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_split = {split: [(root / r["file"], int(r["class_id"])) for r in rows if r["split"] == split]
                for split in ("train", "test")}
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    records = []
    for split, count in (("train", args.train), ("test", args.test)):
        photos = by_split[split]
        for i in range(count):
            canvas = background([p for p, _ in photos], args.size, rng, sharp=args.clutter == "sharp")
            objects = paste_objects(canvas, photos, rng, args.min_fraction, args.max_fraction, args.max_objects)
            name = f"images/{split}_{i:05d}.jpg"
            canvas.save(out / name, quality=90)
            records += [[name, *(f"{v:.5f}" for v in box), class_id, split] for box, class_id in objects]
    with (out / "boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "x1", "y1", "x2", "y2", "class_id", "split"])
        writer.writerows(records)
    log.info("%d composites, %d boxes -> %s", args.train + args.test, len(records), out / "boxes.csv")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
