#!/usr/bin/env python
"""Download (or link) Revisited Oxford / Paris into ``DATA_ROOT/<name>/`` in the revisitop layout.

Layout: ``DATA_ROOT/<name>/gnd_<name>.pkl`` + ``DATA_ROOT/<name>/jpg/<image>.jpg`` for ``roxford5k`` and
``rparis6k`` (the Paris archives nest images in per-landmark folders; they are flattened into ``jpg/``).
``--distractors`` also fetches the revisitop 1M distractors into ``DATA_ROOT/revisitop1m/jpg`` (100 archives,
several hundred GB of downloads and disk; their image list goes to ``DATA_ROOT/revisitop1m/revisitop1m.txt``).

Sources (as in the revisitop download code):
  ground truth   http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/gnd_<name>.pkl
  roxford5k      https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz
  rparis6k       https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz, paris_2.tgz
  revisitop1m    http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{1..100}.tar.gz
                 http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt
If an Oxford/Paris archive answers 404, its ``-v1`` name (e.g. oxbuild_images-v1.tgz) is tried as well.
The environment variable ``REVISITOP_URL`` replaces all of these by one base URL holding every file by its
plain name (a mirror, or a test server).

``--from DIR`` uses local files instead: for each set, DIR/<name>/ or DIR itself must hold gnd_<name>.pkl
and either a jpg/ folder (then the folder is symlinked, or copied with ``--copy``) or the image archives
(then they are extracted). For the distractors: DIR/revisitop1m/ or DIR with jpg/ or the 100 archives.

Every prepared set is checked before it is put in place: the ground truth must load with
``data.revisitop.load_revisitop`` and every image of ``imlist`` / ``qimlist`` must exist.

Exit codes: 0 done, 1 bad input / target exists / images missing, 2 download failed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402

from msretrieval.data.download import (PrepareError, RemoteFile, add_output_options, add_source_target_options,
                                       download, extract_jpegs, find_local, listing, one_line, place_folder,
                                       resolve_source, staged)
from msretrieval.data.revisitop import RevisitopError, load_revisitop
from msretrieval.data.roots import resolve_data_root
from msretrieval.utils.cli import run_cli

LOG = logging.getLogger("download_revisitop")

URL_ENV = "REVISITOP_URL"
GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/"
DISTRACTORS = "revisitop1m"
DISTRACTOR_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/"
DISTRACTOR_LIST_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
DISTRACTOR_PARTS = 100
DISTRACTOR_LIST = f"{DISTRACTORS}.txt"

# The image archives of each set; the "-v1" names are other published names of the same files.
SETS: dict[str, tuple[RemoteFile, ...]] = {
    "roxford5k": (RemoteFile("oxbuild_images.tgz", "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/",
                             ("oxbuild_images-v1.tgz",)),),
    "rparis6k": (RemoteFile("paris_1.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/",
                            ("paris_1-v1.tgz",)),
                 RemoteFile("paris_2.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/",
                            ("paris_2-v1.tgz",))),
}


def distractor_archives() -> list[RemoteFile]:
    return [RemoteFile(f"{DISTRACTORS}.{i}.tar.gz", DISTRACTOR_URL) for i in range(1, DISTRACTOR_PARTS + 1)]


# ----------------------------------------------------------------------------------- Oxford / Paris


def local_set_folder(source: Path, name: str) -> Path:
    for folder in (source / name, source):
        if (folder / f"gnd_{name}.pkl").is_file():
            return folder
    raise PrepareError(f"--from {source}: no gnd_{name}.pkl in {source / name} or {source}")


def prepare_set(name: str, partial: Path, source: Path | None, copy: bool, downloads: Path,
                show_progress: bool, downloaded: list[Path]) -> tuple[str, str]:
    """Fill ``partial`` (a future DATA_ROOT/<name>); returns where the images and the ground truth came from
    (for messages)."""
    gnd_name = f"gnd_{name}.pkl"
    hint = f"Use --from DIR with {gnd_name} and the image archives (or a jpg/ folder) of {name}."
    if source is not None:
        folder = local_set_folder(source, name)
        if (folder / "jpg").is_dir():
            place_folder(folder, partial, copy)
            return str(folder / "jpg"), str(folder / gnd_name)
        archives = [find_local(folder, archive) for archive in SETS[name]]
        if None in archives:
            wanted = " + ".join(archive.filename for archive in SETS[name])
            raise PrepareError(f"--from {source}: {folder} has {gnd_name} but neither a jpg/ folder nor the "
                               f"archive(s) {wanted}")
        gnd = folder / gnd_name
    else:
        gnd = download(RemoteFile(gnd_name, GND_URL.format(name=name)), downloads / gnd_name, URL_ENV,
                       show_progress, hint)
        archives = [download(archive, downloads / archive.filename, URL_ENV, show_progress, hint)
                    for archive in SETS[name]]
        downloaded.extend([gnd, *archives])
    (partial / "jpg").mkdir(parents=True)
    shutil.copy2(gnd, partial / gnd_name)
    count = sum(extract_jpegs(archive, partial / "jpg", flatten=True, show_progress=show_progress)
                for archive in archives)
    LOG.info("%s: %d images extracted", name, count)
    return "the extracted archives (" + ", ".join(a.name for a in archives) + ")", str(gnd)


def validate_set(partial_root: Path, name: str, where: str, gnd_origin: str) -> None:
    try:
        dataset = load_revisitop(partial_root, name)
    except RevisitopError as error:  # name the user's file, not the temporary copy
        message = one_line(error).replace(str(partial_root / name / f"gnd_{name}.pkl"), gnd_origin)
        raise PrepareError(f"{name}: {message}") from None
    listed = dict.fromkeys([*dataset.database_paths, *dataset.query_paths])
    missing = [path.name for path in listed if not path.is_file()]
    if missing:
        raise PrepareError(f"{name}: {len(missing)} of {len(listed)} images listed in gnd_{name}.pkl are "
                           f"missing from {where}: {listing(missing)}")
    LOG.info("validated %s: %d database images, %d queries", name, len(dataset.database), len(dataset.queries))


# ---------------------------------------------------------------------------------------- distractors


def local_distractor_folder(source: Path) -> Path:
    for folder in (source / DISTRACTORS, source):
        if (folder / "jpg").is_dir() or find_local(folder, distractor_archives()[0]):
            return folder
    raise PrepareError(f"--from {source}: no {DISTRACTORS} jpg/ folder or {DISTRACTORS}.N.tar.gz archives in "
                       f"{source / DISTRACTORS} or {source}")


def prepare_distractors(partial: Path, source: Path | None, copy: bool, downloads: Path, keep_archives: bool,
                        show_progress: bool) -> str:
    """Fill ``partial``; resumable: parts already extracted into it are listed in ``partial/.extracted``."""
    hint = f"Use --from DIR with {DISTRACTORS}/jpg/ or the {DISTRACTORS}.N.tar.gz archives."
    archives = distractor_archives()
    if source is not None:
        folder = local_distractor_folder(source)
        if (folder / "jpg").is_dir():
            place_folder(folder, partial, copy)
            return str(folder / "jpg")
        local = {archive.filename: find_local(folder, archive) for archive in archives}
        absent = [name for name, path in local.items() if path is None]
        if absent:
            raise PrepareError(f"--from {source}: {len(absent)} of {DISTRACTOR_PARTS} distractor archives are "
                               f"missing in {folder}: {listing(absent)}")
        image_list = folder / DISTRACTOR_LIST if (folder / DISTRACTOR_LIST).is_file() else None
    else:
        image_list = download(RemoteFile(DISTRACTOR_LIST, DISTRACTOR_LIST_URL), downloads / DISTRACTOR_LIST,
                              URL_ENV, show_progress, hint)
    (partial / "jpg").mkdir(parents=True, exist_ok=True)
    done_file = partial / ".extracted"
    done = set(done_file.read_text().split()) if done_file.is_file() else set()
    if done:
        LOG.info("resuming: %d of %d parts already extracted in %s", len(done), DISTRACTOR_PARTS, partial)
    for index, archive in enumerate(archives, start=1):
        if archive.filename in done:
            continue
        LOG.info("part %d/%d", index, DISTRACTOR_PARTS)
        if source is not None:
            path = local[archive.filename]
        else:
            path = download(archive, downloads / archive.filename, URL_ENV, show_progress, hint)
        extract_jpegs(path, partial / "jpg", flatten=False, show_progress=show_progress)
        with done_file.open("a") as handle:
            handle.write(archive.filename + "\n")
        if source is None and not keep_archives:
            path.unlink()  # the extracted part is recorded; its archive is no longer needed
    done_file.unlink()
    if image_list is not None:
        shutil.copy2(image_list, partial / DISTRACTOR_LIST)
    return f"the extracted {DISTRACTORS} archives"


def validate_distractors(folder: Path, where: str) -> None:
    image_list = folder / DISTRACTOR_LIST
    if not image_list.is_file():
        count = sum(1 for _ in (folder / "jpg").rglob("*.jpg"))
        LOG.warning("%s: no %s to check against; %d images found", DISTRACTORS, DISTRACTOR_LIST, count)
        return
    names = [line.strip() for line in image_list.read_text().splitlines() if line.strip()]
    jpg = folder / "jpg"
    missing = [n for n in names if not (jpg / n).is_file() and not (jpg / f"{n}.jpg").is_file()]
    if missing:
        raise PrepareError(f"{DISTRACTORS}: {len(missing)} of {len(names)} images listed in {DISTRACTOR_LIST} "
                           f"are missing from {where}: {listing(missing)}")
    LOG.info("validated %s: %d images", DISTRACTORS, len(names))


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download Revisited Oxford / Paris (and optionally the revisitop 1M distractors) into "
                    "DATA_ROOT/<name>/ in the revisitop layout (gnd_<name>.pkl + jpg/).",
        epilog=f"Environment: DATA_ROOT (when --data-root is not given), {URL_ENV} (one base URL replacing every "
               f"download source; files are fetched by their plain names). "
               f"Exit codes: 0 ok, 1 error or images missing, 2 download failed.")
    parser.add_argument("--datasets", nargs="+", choices=sorted(SETS), default=list(SETS), metavar="NAME",
                        help=f"sets to prepare: {' '.join(SETS)} (default: both)")
    parser.add_argument("--distractors", action="store_true",
                        help=f"also prepare the {DISTRACTORS} distractors ({DISTRACTOR_PARTS} archives, "
                             "hundreds of GB; off by default)")
    add_source_target_options(
        parser,
        from_help="use local files instead of downloading: DIR/<name>/ or DIR holding gnd_<name>.pkl and either "
                  "a jpg/ folder (linked) or the image archives (extracted)",
        data_root_help="data root; sets go to DATA_ROOT/<name> (default: $DATA_ROOT, else ./data)",
        copy_help="with --from and a jpg/ folder: copy the folder instead of creating a symlink",
        force_help="replace existing DATA_ROOT/<name> folders (a symlink is removed, not followed)")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep downloaded files in DATA_ROOT/.downloads/<name> after success")
    add_output_options(parser)
    args = parser.parse_args(argv)
    args.datasets = list(dict.fromkeys(args.datasets))
    return args


def run(args: argparse.Namespace) -> None:
    data_root = resolve_data_root(args.data_root)
    names = args.datasets + ([DISTRACTORS] if args.distractors else [])
    show_progress = not args.no_progress
    source = resolve_source(args.source)
    existing = [str(data_root / name) for name in names
                if (data_root / name).exists() or (data_root / name).is_symlink()]
    if existing and not args.force:
        raise PrepareError(f"{', '.join(existing)} already exist(s); use --force to replace")
    if source is not None:
        for name in names:
            target = data_root / name
            if not target.is_symlink() and target.exists() and target.resolve() in (source, source / name):
                raise PrepareError(f"--from {args.source} is the target {target} itself")

    for name in names:
        LOG.info("== %s -> %s", name, data_root / name)
        resume = name == DISTRACTORS and source is None
        with staged(data_root, name, args.keep_archives, resume) as stage:
            if name == DISTRACTORS:
                where = prepare_distractors(stage.partial, source, args.copy, stage.downloads, args.keep_archives,
                                            show_progress)
                validate_distractors(stage.partial, where)
            else:
                where, gnd_origin = prepare_set(name, stage.partial, source, args.copy, stage.downloads,
                                                show_progress, stage.downloaded)
                validate_set(stage.partial.parent, name, where, gnd_origin)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), quiet=args.quiet, progress_to_stdout=True)


if __name__ == "__main__":
    sys.exit(main())
