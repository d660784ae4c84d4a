#!/usr/bin/env python
"""Prepare Oxford Flowers-102 as ``DATA_ROOT/flowers102`` (``labels.csv`` + ``images/``).

Three ways in:

* ``--from DIR`` where DIR is a ready pack (``labels.csv`` + ``images/``, e.g. /work/shared/data/flowers102):
  DIR is symlinked as ``DATA_ROOT/flowers102`` (``--copy`` copies it instead).
* ``--from DIR`` where DIR holds the official VGG files: ``imagelabels.mat`` plus ``102flowers.tgz`` or its
  extracted ``jpg/`` folder. The pack is built from them.
* no ``--from``: ``102flowers.tgz`` and ``imagelabels.mat`` are downloaded from the VGG site (the environment
  variable ``FLOWERS102_URL`` replaces the base URL, e.g. for a mirror), then the pack is built.

A built pack has ``labels.csv`` with the columns ``file,class_id,class_name,split,orig_w,orig_h``; ``split`` is
the class-disjoint metric-learning split (``train`` = classes 1-51, ``test`` = classes 52-102). Images are
re-encoded as JPEG (quality 90) with the shorter side resized to ``--shorter-side`` (never enlarged;
0 keeps the original files byte for byte).

Exit codes: 0 done, 1 bad input / target exists / incomplete data, 2 download failed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import tarfile  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

from msretrieval.data.download import (PrepareError, RemoteFile, add_output_options,
                                       add_source_target_options, download, listing, one_line, place_folder, progress,
                                       resolve_source, staged)
from msretrieval.data.manifest import ManifestError, flowers102, read_csv_manifest
from msretrieval.data.roots import resolve_data_root
from msretrieval.utils.cli import run_cli

LOG = logging.getLogger("prepare_flowers102")

NAME = "flowers102"
DEFAULT_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
URL_ENV = "FLOWERS102_URL"
ARCHIVE = "102flowers.tgz"
LABELS_MAT = "imagelabels.mat"
NUM_TRAIN_CLASSES = 51  # class-disjoint split: train = 1..51, test = 52..102
JPEG_QUALITY = 90
DOWNLOAD_HINT = (f"Use --from DIR with a local copy of {ARCHIVE} + {LABELS_MAT} (or a prepared pack with "
                 f"labels.csv + images/).")
IMAGE_NAME = re.compile(r"^image_(\d{5})\.jpg$")
CSV_COLUMNS = ("file", "class_id", "class_name", "split", "orig_w", "orig_h")

# The 102 Oxford flower category names; index = class_id - 1 (class_id = the label in imagelabels.mat).
CLASS_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle",
    "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush", "californian poppy",
    "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy",
    "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)
assert len(CLASS_NAMES) == 102

PACK_README = """# Oxford Flowers-102

Built by scripts/prepare_flowers102.py from the official VGG files (102flowers.tgz, imagelabels.mat;
robots.ox.ac.uk/~vgg/data/flowers/102/). The images belong to their owners; the set is distributed by the
Visual Geometry Group, University of Oxford, for research.

- `images/image_XXXXX.jpg` — the official file names; {resize}.
- `labels.csv` — columns `file,class_id,class_name,split,orig_w,orig_h`; `class_id` is the official label
  (1-102); `split` is class-disjoint: `train` = classes 1-51, `test` = classes 52-102; `orig_w,orig_h` are
  the sizes of the original photos.
"""


# ------------------------------------------------------------------------------------- reading sources


def read_labels(mat_path: Path) -> list[int]:
    from scipy.io import loadmat

    try:
        labels = loadmat(str(mat_path))["labels"]
    except Exception as error:  # scipy raises many kinds on a bad file
        raise PrepareError(f"cannot read labels from {mat_path}: {one_line(error)}") from None
    labels = [int(v) for v in labels.reshape(-1)]
    bad = sorted({v for v in labels if not 1 <= v <= len(CLASS_NAMES)})
    if bad:
        raise PrepareError(f"{mat_path}: labels outside 1..{len(CLASS_NAMES)}: {bad[:5]}")
    if not labels:
        raise PrepareError(f"{mat_path}: no labels")
    return labels


def iter_folder(folder: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for path in sorted(folder.iterdir()):
        if IMAGE_NAME.match(path.name) and path.is_file():
            yield path.name, path.read_bytes


def iter_archive(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Stream the JPEGs of a .tgz (no extraction to disk; only base names are used)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and IMAGE_NAME.match(name):
                    data = tar.extractfile(member).read()
                    yield name, (lambda data=data: data)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise PrepareError(f"cannot read {archive}: {one_line(error)} (a truncated download? delete it and "
                           f"run again)") from None


def is_pack(folder: Path) -> bool:
    return (folder / "labels.csv").is_file() and (folder / "images").is_dir()


def official_sources(folder: Path) -> tuple[Path, Path] | None:
    """(imagelabels.mat, jpg folder or 102flowers.tgz) if ``folder`` holds the official files."""
    mat = folder / LABELS_MAT
    if not mat.is_file():
        return None
    if (folder / "jpg").is_dir():
        return mat, folder / "jpg"
    if (folder / ARCHIVE).is_file():
        return mat, folder / ARCHIVE
    return None


# ------------------------------------------------------------------------------------------- building


def convert(name: str, load: Callable[[], bytes], out_dir: Path, shorter_side: int) -> tuple[str, int, int]:
    """Write one image to ``out_dir``; returns (name, original width, original height)."""
    from PIL import Image

    data = load()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if shorter_side <= 0:
                (out_dir / name).write_bytes(data)
                return name, width, height
            scale = shorter_side / min(width, height)
            image = image.convert("RGB")
            if scale < 1:
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            image.save(out_dir / name, "JPEG", quality=JPEG_QUALITY)
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise PrepareError(f"cannot decode {name}: {one_line(error)}") from None
    return name, width, height


def build_pack(mat_path: Path, images: Path, out: Path, shorter_side: int, workers: int,
               show_progress: bool) -> None:
    labels = read_labels(mat_path)
    expected = {f"image_{i:05d}.jpg": label for i, label in enumerate(labels, start=1)}
    LOG.info("building the pack from %s and %s (%d images, shorter side %s)", mat_path, images, len(labels),
             f"{shorter_side} px" if shorter_side > 0 else "kept")
    image_dir = out / "images"
    image_dir.mkdir(parents=True)
    source = iter_folder(images) if images.is_dir() else iter_archive(images)
    sizes: dict[str, tuple[int, int]] = {}
    extra = 0

    def wanted():
        nonlocal extra
        for name, load in source:
            if name in expected:
                yield name, load
            else:
                extra += 1

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress(total=len(expected), unit="img", desc="images", disable=not show_progress) as bar:
        pending = []
        for name, load in wanted():
            pending.append(pool.submit(convert, name, load, image_dir, shorter_side))
            if len(pending) >= 4 * max(1, workers):  # bound the memory held by queued images
                for future in pending:
                    name_, w, h = future.result()
                    sizes[name_] = (w, h)
                    bar.update()
                pending = []
        for future in pending:
            name_, w, h = future.result()
            sizes[name_] = (w, h)
            bar.update()
    if extra:
        LOG.warning("%d image(s) in %s have no label in %s and were skipped", extra, images, mat_path.name)
    missing = [name for name in expected if name not in sizes]
    if missing:
        raise PrepareError(f"{len(missing)} of {len(expected)} labelled images are missing in {images}: "
                           f"{listing(missing)}")
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for name, label in expected.items():
            w, h = sizes[name]
            split = "train" if label <= NUM_TRAIN_CLASSES else "test"
            writer.writerow([f"images/{name}", label, CLASS_NAMES[label - 1], split, w, h])
    resize = (f"re-encoded as JPEG quality {JPEG_QUALITY}, shorter side resized to {shorter_side} px"
              if shorter_side > 0 else "the original files")
    (out / "README.md").write_text(PACK_README.format(resize=resize), encoding="utf-8")


def validate(partial_root: Path) -> None:
    """The pack must read as train/test manifests and every listed image must exist."""
    try:
        read_csv_manifest(partial_root / NAME / "labels.csv")
        train, test = flowers102(partial_root, "train"), flowers102(partial_root, "test")
    except ManifestError as error:
        raise PrepareError(f"invalid pack: {one_line(error)}") from None
    missing = [p for p in (*train.paths, *test.paths) if not p.is_file()]
    if missing:
        raise PrepareError(f"{len(missing)} image(s) listed in labels.csv are missing: "
                           f"{listing(p.name for p in missing)}")
    LOG.info("validated: %d train images (%d classes), %d test images (%d classes)",
             len(train), train.num_classes, len(test), test.num_classes)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prepare Oxford Flowers-102 as DATA_ROOT/flowers102 (labels.csv + images/) from a ready "
                    "pack, the official VGG files, or a download of them.",
        epilog=f"Environment: DATA_ROOT (when --data-root is not given), {URL_ENV} (base URL replacing "
               f"{DEFAULT_BASE_URL}). Exit codes: 0 ok, 1 error, 2 download failed.")
    add_source_target_options(
        parser,
        from_help="use local files instead of downloading: a ready pack (labels.csv + images/), which is linked, "
                  f"or the official files ({LABELS_MAT} plus {ARCHIVE} or its extracted jpg/ folder), from which "
                  "the pack is built",
        data_root_help="data root; the pack goes to DATA_ROOT/flowers102 (default: $DATA_ROOT, else ./data)",
        copy_help="with --from a ready pack: copy it instead of creating a symlink",
        force_help="replace an existing DATA_ROOT/flowers102 (a symlink is removed, not followed)")
    parser.add_argument("--shorter-side", type=int, default=144, metavar="PX",
                        help="when building: resize so the shorter side is PX pixels (never enlarges; JPEG "
                             "quality 90); 0 keeps the original files (default: 144)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads for decoding/resizing (default: min(8, CPUs))")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the downloaded files in DATA_ROOT/.downloads/flowers102 after a successful build")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.shorter_side < 0:
        parser.error("--shorter-side must be >= 0")
    return args


def run(args: argparse.Namespace) -> None:
    data_root = resolve_data_root(args.data_root)
    target = data_root / NAME
    show_progress = not args.no_progress
    source = resolve_source(args.source)
    if (target.exists() or target.is_symlink()) and not args.force:
        raise PrepareError(f"{target} already exists; use --force to replace it")
    if source is not None and not target.is_symlink() and target.exists() and target.resolve() == source:
        raise PrepareError(f"--from {args.source} is the target {target} itself")

    with staged(data_root, NAME, args.keep_archives) as stage:
        if source is not None:
            official = official_sources(source)
            if is_pack(source):
                if args.shorter_side != 144:
                    LOG.warning("--shorter-side is ignored: %s is a ready pack", source)
                place_folder(source, stage.partial, args.copy)
            elif official is not None:
                build_pack(*official, stage.partial, args.shorter_side, args.workers, show_progress)
            else:
                raise PrepareError(
                    f"--from {args.source}: expected a ready pack (labels.csv + images/) or the official files "
                    f"({LABELS_MAT} plus {ARCHIVE} or a jpg/ folder)")
        else:
            for filename in (LABELS_MAT, ARCHIVE):
                remote = RemoteFile(filename, DEFAULT_BASE_URL)
                stage.downloaded.append(download(remote, stage.downloads / filename, URL_ENV, show_progress,
                                                 DOWNLOAD_HINT))
            mat_path, archive = stage.downloaded
            build_pack(mat_path, archive, stage.partial, args.shorter_side, args.workers, show_progress)
        validate(stage.partial.parent)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), quiet=args.quiet, progress_to_stdout=True)


if __name__ == "__main__":
    sys.exit(main())
