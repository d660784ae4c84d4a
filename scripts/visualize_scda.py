#!/usr/bin/env python
"""Where does SCDA look? A grid of images with SCDA's selected region, its box and the ground truth.

    python scripts/visualize_scda.py --flowers102 --split test --num-images 16 --out scda_grid.png
    python scripts/visualize_scda.py --benchmark-csv data/cub/labels.csv --split test --pcp-all

Each cell shows one image (fitted into a square cell) with:
    bright area   the last-layer positions SCDA keeps (A > mean(A), largest 8-connected component),
                  upsampled from the feature grid to the image and outlined in magenta; the positions it
                  drops are dimmed (readable whatever the flower's colour);
    yellow box    the box around that component (``baselines.scda.component_boxes``);
    green box     the ground-truth box, when the manifest has the columns x1, y1, x2, y2.
The caption gives the position in the split, the file name and, with boxes, the IoU.

Ground-truth boxes are in pixels of the original photo; when the manifest also has orig_w, orig_h (resized
packs) they are rescaled to the loaded file. With boxes, PCP (fraction of images with IoU > 0.5, the SCDA
paper's localisation score) is reported over the shown images, or with ``--pcp-all`` over the whole split.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from scipy import ndimage  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from msretrieval.baselines.scda import SCDA, component_boxes
from msretrieval.data.images import load_image
from msretrieval.data.manifest import LabelledImageSet, flowers102, read_csv_manifest
from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import create_backbone
from msretrieval.retrieval.evaluation.localization import (boxes_from_manifest, box_iou, original_sizes, pcp,
                                                           rescale_boxes)
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("visualize_scda")

MASK_COLOUR = (255, 0, 255)   # outline of the selected region
DROPPED_BRIGHTNESS = 0.35      # dropped positions are dimmed to this fraction
PREDICTED_COLOUR = (255, 220, 0)
TRUTH_COLOUR = (0, 230, 90)
BACKGROUND = (24, 24, 24)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark-csv", default=None, help="labelled manifest (file, class_id[, split, x1..y2])")
    source.add_argument("--flowers102", action="store_true", help="DATA_ROOT/flowers102/labels.csv")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--split", default=None,
                        help="rows with this split value (default: test for --flowers102, all rows for a CSV)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm architecture name")
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (for smoke tests)")
    parser.add_argument("--image-size", type=int, default=224, help="network input: shorter side (default 224)")
    parser.add_argument("--cell-size", type=int, default=None,
                        help="side of one square grid cell in pixels (default: --image-size)")
    parser.add_argument("--num-images", type=int, default=16, help="images in the grid (default 16)")
    parser.add_argument("--columns", type=int, default=4, help="grid columns (default 4)")
    parser.add_argument("--seed", type=int, default=None,
                        help="pick the images at random with this seed (default: the first N of the split)")
    parser.add_argument("--pcp-all", action="store_true", help="PCP over the whole split (needs box columns)")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="PCP counts IoU > this (default 0.5)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default="scda_grid.png", help="grid PNG path (default scda_grid.png)")
    args = parser.parse_args(argv)
    for name in ("image_size", "num_images", "columns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.cell_size is not None and args.cell_size < 16:
        parser.error("--cell-size must be at least 16")
    return args


def load_set(args) -> LabelledImageSet:
    if args.flowers102:
        return flowers102(resolve_data_root(args.data_root), split=args.split or "test")
    return read_csv_manifest(args.benchmark_csv, split=args.split)


def choose_images(total: int, count: int, seed: int | None) -> np.ndarray:
    """Indices of the shown images: the first ``count``, or ``count`` at random (in split order) with a seed."""
    if count > total:
        log.warning("asked for %d images, the split has %d: showing all", count, total)
        count = total
    if seed is None:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


class Localizer:
    """One image -> SCDA's selected mask (h, w) on the last conv grid and its box in image pixels."""

    def __init__(self, scda: SCDA, transform: EvalTransform, device: torch.device):
        self.scda, self.transform, self.device = scda, transform, device

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        batch = self.transform(image).unsqueeze(0).to(self.device)
        masks = self.scda.localize(batch)
        return masks[0, 0].cpu().numpy(), component_boxes(masks, [image.size])[0]


class TruthBoxes:
    """Ground-truth boxes of a set in the pixels of the loaded files (None when the manifest has none)."""

    def __init__(self, image_set: LabelledImageSet):
        self.boxes = boxes_from_manifest(image_set)
        self.original = original_sizes(image_set) if self.boxes is not None else None
        if self.original is not None:
            log.info("boxes are in original-photo pixels (orig_w, orig_h): rescaling them to the loaded files")

    def __bool__(self) -> bool:
        return self.boxes is not None

    def get(self, index: int, image_size: tuple[int, int]) -> np.ndarray | None:
        if self.boxes is None:
            return None
        box = self.boxes[index]
        if self.original is not None:
            box = rescale_boxes(box[None], [self.original[index]], [image_size])[0]
        return box


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap default font
        return ImageFont.load_default()


def render_cell(image: Image.Image, mask: np.ndarray, box, truth, cell: int, caption: str) -> Image.Image:
    """The image fitted into a ``cell`` x ``cell`` square, with the mask tint, the boxes and a caption."""
    scale = cell / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    shown = image.resize((width, height), Image.BILINEAR)
    # Nearest upsampling of the grid: feature cell (i, j) covers rows [i H/h, (i+1) H/h) of the image, the
    # convention component_boxes uses.
    selected = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((width, height), Image.NEAREST)
    dimmed = Image.blend(Image.new("RGB", shown.size, (0, 0, 0)), shown, DROPPED_BRIGHTNESS)
    shown = Image.composite(shown, dimmed, selected)
    line = max(1, round(cell / 112))
    inside = np.asarray(selected) > 0
    outline = inside & ~ndimage.binary_erosion(inside, iterations=line, border_value=0)
    pixels = np.array(shown)
    pixels[outline] = MASK_COLOUR
    shown = Image.fromarray(pixels)
    draw = ImageDraw.Draw(shown)
    for coords, colour in ((truth, TRUTH_COLOUR), (box, PREDICTED_COLOUR)):
        if coords is None:
            continue
        x1, y1, x2, y2 = (float(v) * scale for v in coords)
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        x2, y2 = min(max(x2 - 1, x1), width - 1), min(max(y2 - 1, y1), height - 1)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
    canvas = Image.new("RGB", (cell, cell), BACKGROUND)
    canvas.paste(shown, ((cell - width) // 2, (cell - height) // 2))
    font = _font(max(8, cell // 18))
    draw = ImageDraw.Draw(canvas, "RGBA")
    left, top, right, bottom = draw.textbbox((3, 2), caption, font=font)
    draw.rectangle([0, 0, min(cell, right + 3), bottom + 2], fill=(0, 0, 0, 160))
    draw.text((3, 2), caption, fill=(255, 255, 255), font=font)
    return canvas


def tile(cells: list[Image.Image], columns: int, cell: int) -> Image.Image:
    """Cells in row-major order: min(columns, n) wide, ceil(n / columns) high."""
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), BACKGROUND)
    for i, image in enumerate(cells):
        grid.paste(image, ((i % columns) * cell, (i // columns) * cell))
    return grid


def main(argv=None) -> int:
    args = parse_args(argv)
    image_set = load_set(args)
    truth = TruthBoxes(image_set)
    if args.pcp_all and not truth:
        raise UserError(f"--pcp-all needs ground-truth boxes: {image_set.name} has no x1, y1, x2, y2 columns")
    shown_indices = choose_images(len(image_set), args.num_images, args.seed)
    device = torch.device(args.device)
    backbone = create_backbone(args.backbone, pretrained=not args.random_init).eval().to(device)
    scda = SCDA(backbone, "scda")
    transform = EvalTransform(args.image_size, mode="shorter", mean=backbone.preprocessing.mean,
                              std=backbone.preprocessing.std)
    localize = Localizer(scda, transform, device)
    cell = args.cell_size or args.image_size
    log.info("%s: %d images, showing %d; %s (%s weights), SCDA layer %s, shorter side %d px",
             image_set.name, len(image_set), len(shown_indices), backbone.name, backbone.weights_tag,
             scda.last_layer, args.image_size)

    predicted: dict[int, np.ndarray] = {}
    truths: dict[int, np.ndarray] = {}
    cells = []
    selected_fraction = []
    for index in shown_indices:
        index = int(index)
        path = image_set.paths[index]
        image = load_image(path)
        mask, box = localize(image)
        selected_fraction.append(mask.mean())
        predicted[index] = box
        gt = truth.get(index, image.size)
        caption = f"{index} {path.stem}"
        if gt is not None:
            truths[index] = gt
            caption += f"  IoU {box_iou(box[None], gt[None])[0]:.2f}"
        cells.append(render_cell(image, mask, box, gt, cell, caption))
    grid = tile(cells, args.columns, cell)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    log.info("mask covers %.0f%% of the feature grid on average (min %.0f%%, max %.0f%%); "
             "bright + magenta outline = selected, yellow = SCDA box, green = ground truth",
             100 * np.mean(selected_fraction), 100 * np.min(selected_fraction), 100 * np.max(selected_fraction))
    print(f"Grid: {out} ({len(cells)} images, {grid.width}x{grid.height} px)")

    if not truth:
        log.info("no x1, y1, x2, y2 columns in the manifest: no ground-truth boxes, no PCP")
        return 0
    shown = [int(i) for i in shown_indices]
    shown_pcp = pcp(np.stack([predicted[i] for i in shown]), np.stack([truths[i] for i in shown]),
                    args.iou_threshold)
    log.info("PCP on the %d shown images: %.3f (IoU > %g)", len(shown), shown_pcp, args.iou_threshold)
    if not args.pcp_all:
        print(f"PCP: {shown_pcp:.3f} ({len(shown)} images)")
        return 0
    for index in tqdm(range(len(image_set)), desc="PCP", unit="img", disable=None):
        if index in predicted:
            continue
        image = load_image(image_set.paths[index])
        predicted[index] = localize(image)[1]
        truths[index] = truth.get(index, image.size)
    order = range(len(image_set))
    score = pcp(np.stack([predicted[i] for i in order]), np.stack([truths[i] for i in order]), args.iou_threshold)
    log.info("PCP on all %d images of %s: %.3f (IoU > %g)", len(image_set), image_set.name, score,
             args.iou_threshold)
    print(f"PCP: {score:.3f} ({len(image_set)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
