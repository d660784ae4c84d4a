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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import http.client  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import PurePosixPath  # noqa: E402

from data.revisitop import RevisitopError, load_revisitop  # noqa: E402
from data.roots import resolve_data_root  # noqa: E402

LOG = logging.getLogger("download_revisitop")

URL_ENV = "REVISITOP_URL"
GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/"
DISTRACTORS = "revisitop1m"
DISTRACTOR_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/"
DISTRACTOR_LIST_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
DISTRACTOR_PARTS = 100
DISTRACTOR_LIST = f"{DISTRACTORS}.txt"
DOWNLOAD_TIMEOUT = 60  # seconds, for the connection and for each read


@dataclass(frozen=True)
class Archive:
    filename: str
    base_url: str
    alternatives: tuple[str, ...] = ()  # other published names of the same file, tried on HTTP 404

    @property
    def names(self) -> tuple[str, ...]:
        return (self.filename, *self.alternatives)


SETS: dict[str, tuple[Archive, ...]] = {
    "roxford5k": (Archive("oxbuild_images.tgz", "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/",
                          ("oxbuild_images-v1.tgz",)),),
    "rparis6k": (Archive("paris_1.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/",
                         ("paris_1-v1.tgz",)),
                 Archive("paris_2.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/",
                         ("paris_2-v1.tgz",))),
}


def distractor_archives() -> list[Archive]:
    return [Archive(f"{DISTRACTORS}.{i}.tar.gz", DISTRACTOR_URL) for i in range(1, DISTRACTOR_PARTS + 1)]


class PrepareError(Exception):
    """A failure reported as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- helpers


def setup_logging(quiet: bool) -> None:
    """Progress (INFO) goes to stdout, warnings and errors to stderr."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(out)
    root.addHandler(err)


def progress(**kwargs):
    from tqdm import tqdm

    return tqdm(mininterval=0.5, dynamic_ncols=True, **kwargs)


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never following it) or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def one_line(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        text = str(error.reason)
    else:
        text = str(error)
    return " ".join((text or type(error).__name__).split())


def listing(names, limit: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def urls_for(archive: Archive) -> list[str]:
    override = os.environ.get(URL_ENV)
    if override:
        return [override.rstrip("/") + "/" + archive.filename]
    return [archive.base_url + name for name in archive.names]


def download(archive: Archive, destination: Path, show_progress: bool, hint: str) -> Path:
    """Fetch an archive to ``destination`` (via ``.part``); an existing complete file is reused."""
    if destination.is_file():
        LOG.info("using the already downloaded %s", destination)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    urls = urls_for(archive)
    for attempt, url in enumerate(urls, start=1):
        LOG.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                total = response.headers.get("Content-Length")
                with partial.open("wb") as handle, progress(
                        total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=destination.name, disable=not show_progress) as bar:
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        handle.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
            partial.unlink(missing_ok=True)
            if isinstance(error, urllib.error.HTTPError) and error.code == 404 and attempt < len(urls):
                LOG.info("%s: not found, trying %s", url, urls[attempt])
                continue
            raise PrepareError(f"download of {url} failed ({one_line(error)}); no network? {hint}",
                               code=2) from None
        partial.replace(destination)
        return destination
    raise AssertionError("unreachable")


def find_local(folder: Path, archive: Archive) -> Path | None:
    for name in archive.names:
        if (folder / name).is_file():
            return folder / name
    return None


def safe_relative(member_name: str) -> PurePosixPath | None:
    """The member's path relative to the extraction folder, or None if it would escape it."""
    path = PurePosixPath(member_name)
    parts = [part for part in path.parts if part not in ("", ".")]
    if path.is_absolute() or ".." in parts or not parts:
        return None
    return PurePosixPath(*parts)


def extract(archive: Path, out_dir: Path, flatten: bool, show_progress: bool) -> int:
    """Extract the .jpg files of ``archive`` into ``out_dir`` (only base names if ``flatten``)."""
    LOG.info("extracting %s", archive.name)
    count = duplicates = 0
    try:
        with tarfile.open(archive, "r:*") as tar, progress(unit="img", desc=archive.name,
                                                           disable=not show_progress) as bar:
            for member in tar:
                relative = safe_relative(member.name)
                if not member.isfile() or relative is None or not relative.name.lower().endswith(".jpg"):
                    continue
                target = out_dir / (relative.name if flatten else relative)
                if flatten and target.exists():
                    duplicates += 1
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, target.open("wb") as handle:
                    shutil.copyfileobj(source, handle, 1 << 20)
                count += 1
                bar.update()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise PrepareError(f"cannot extract {archive}: {one_line(error)} (a truncated download? delete it "
                           f"and run again)") from None
    if duplicates:
        LOG.warning("%s: %d image name(s) occurred twice; the later copy was kept", archive.name, duplicates)
    return count


def place(source: Path, out: Path, copy: bool) -> None:
    """Symlink (or copy) a ready folder as ``out``."""
    if copy:
        LOG.info("copying %s", source)
        shutil.copytree(source, out)
        return
    LOG.info("linking %s", source)
    try:
        out.symlink_to(source, target_is_directory=True)
    except OSError as error:
        raise PrepareError(f"cannot create a symlink {out} -> {source} ({one_line(error)}); "
                           f"use --copy") from None


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
            place(folder, partial, copy)
            return str(folder / "jpg"), str(folder / gnd_name)
        archives = [find_local(folder, archive) for archive in SETS[name]]
        if None in archives:
            wanted = " + ".join(archive.filename for archive in SETS[name])
            raise PrepareError(f"--from {source}: {folder} has {gnd_name} but neither a jpg/ folder nor the "
                               f"archive(s) {wanted}")
        gnd = folder / gnd_name
    else:
        gnd = download(Archive(gnd_name, GND_URL.format(name=name)), downloads / gnd_name, show_progress, hint)
        archives = [download(archive, downloads / archive.filename, show_progress, hint)
                    for archive in SETS[name]]
        downloaded.extend([gnd, *archives])
    (partial / "jpg").mkdir(parents=True)
    shutil.copy2(gnd, partial / gnd_name)
    count = sum(extract(archive, partial / "jpg", flatten=True, show_progress=show_progress)
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
            place(folder, partial, copy)
            return str(folder / "jpg")
        local = {archive.filename: find_local(folder, archive) for archive in archives}
        absent = [name for name, path in local.items() if path is None]
        if absent:
            raise PrepareError(f"--from {source}: {len(absent)} of {DISTRACTOR_PARTS} distractor archives are "
                               f"missing in {folder}: {listing(absent)}")
        image_list = folder / DISTRACTOR_LIST if (folder / DISTRACTOR_LIST).is_file() else None
    else:
        image_list = download(Archive(DISTRACTOR_LIST, DISTRACTOR_LIST_URL), downloads / DISTRACTOR_LIST,
                              show_progress, hint)
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
            path = download(archive, downloads / archive.filename, show_progress, hint)
        extract(path, partial / "jpg", flatten=False, show_progress=show_progress)
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
    parser.add_argument("--from", dest="source", metavar="DIR", type=Path,
                        help="use local files instead of downloading: DIR/<name>/ or DIR holding gnd_<name>.pkl "
                             "and either a jpg/ folder (linked) or the image archives (extracted)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="data root; sets go to DATA_ROOT/<name> (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--copy", action="store_true",
                        help="with --from and a jpg/ folder: copy the folder instead of creating a symlink")
    parser.add_argument("--force", action="store_true",
                        help="replace existing DATA_ROOT/<name> folders (a symlink is removed, not followed)")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep downloaded files in DATA_ROOT/.downloads/<name> after success")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)
    args.datasets = list(dict.fromkeys(args.datasets))
    return args


def run(args: argparse.Namespace) -> None:
    data_root = resolve_data_root(args.data_root)
    names = args.datasets + ([DISTRACTORS] if args.distractors else [])
    show_progress = not args.no_progress
    source = None
    if args.source is not None:
        source = args.source.expanduser().resolve()
        if not source.is_dir():
            raise PrepareError(f"--from {args.source}: not a directory")
    existing = [str(data_root / name) for name in names
                if (data_root / name).exists() or (data_root / name).is_symlink()]
    if existing and not args.force:
        raise PrepareError(f"{', '.join(existing)} already exist(s); use --force to replace")
    if source is not None:
        for name in names:
            target = data_root / name
            if not target.is_symlink() and target.exists() and target.resolve() in (source, source / name):
                raise PrepareError(f"--from {args.source} is the target {target} itself")

    data_root.mkdir(parents=True, exist_ok=True)
    partial_root = data_root / ".partial"
    for name in names:
        target, partial = data_root / name, partial_root / name
        downloads = data_root / ".downloads" / name
        downloaded: list[Path] = []
        resumable = name == DISTRACTORS and source is None
        if not (resumable and partial.is_dir() and not partial.is_symlink()):
            remove_path(partial)  # left over from an interrupted run
        partial_root.mkdir(exist_ok=True)
        LOG.info("== %s -> %s", name, target)
        keep_partial = False
        try:
            if name == DISTRACTORS:
                keep_partial = resumable
                where = prepare_distractors(partial, source, args.copy, downloads, args.keep_archives,
                                            show_progress)
                validate_distractors(partial, where)
            else:
                where, gnd_origin = prepare_set(name, partial, source, args.copy, downloads, show_progress,
                                                downloaded)
                validate_set(partial_root, name, where, gnd_origin)
            if target.exists() or target.is_symlink():
                LOG.info("--force: removing the existing %s", target)
                remove_path(target)
            partial.replace(target)
            keep_partial = False
        finally:
            if keep_partial and partial.is_dir():
                LOG.warning("the partial %s is kept in %s; run again to resume", name, partial)
            else:
                remove_path(partial)
            remove_if_empty(partial_root)
            remove_if_empty(downloads)  # a failed run keeps finished downloads for the next try
            remove_if_empty(downloads.parent)
        if not args.keep_archives:
            for path in downloaded:
                path.unlink(missing_ok=True)
            remove_if_empty(downloads)
            remove_if_empty(downloads.parent)
        LOG.info("ready: %s", target)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    try:
        run(args)
    except PrepareError as error:
        print(f"download_revisitop: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("download_revisitop: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
