"""Shared plumbing of the data preparation scripts (scripts/prepare_flowers102.py, scripts/download_revisitop.py).

Downloading with resumable ``.part`` files, safe archive extraction and placing a prepared folder live here so
that both scripts behave the same way (their logging and error lines: ``utils.cli.run_cli``). Torch-free on
purpose: the scripts must stay quick to start and usable without torch installed.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from msretrieval.utils.errors import UserError

LOG = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 60  # seconds, for the connection and for each read


class PrepareError(UserError):
    """A failure reported as one line on stderr (by ``utils.cli.run_cli``); ``exit_code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code


@dataclass(frozen=True)
class RemoteFile:
    """A file published at ``base_url``; ``alternatives`` are other published names of it, tried on HTTP 404."""

    filename: str
    base_url: str
    alternatives: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.filename, *self.alternatives)


# ------------------------------------------------------------------------------------ command line & logging


def add_source_target_options(parser: argparse.ArgumentParser, *, from_help: str, data_root_help: str,
                              copy_help: str, force_help: str) -> None:
    """``--from``, ``--data-root``, ``--copy`` and ``--force``: the same options in every preparation script
    (they feed resolve_source and staged); only the help texts name the script's own files."""
    parser.add_argument("--from", dest="source", metavar="DIR", type=Path, help=from_help)
    parser.add_argument("--data-root", metavar="DIR", help=data_root_help)
    parser.add_argument("--copy", action="store_true", help=copy_help)
    parser.add_argument("--force", action="store_true", help=force_help)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """The options every preparation script has for what it prints."""
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def progress(**kwargs):
    """A tqdm bar that redraws at most twice a second (tqdm is imported only when a bar is made)."""
    from tqdm import tqdm

    return tqdm(mininterval=0.5, dynamic_ncols=True, **kwargs)


def one_line(error: BaseException) -> str:
    """The error's message on one line, for PrepareError texts (HTTP errors keep their status code)."""
    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        text = str(error.reason)
    else:
        text = str(error)
    return " ".join((text or type(error).__name__).split())


def listing(names: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma separated, with `` ...`` when there are more: messages stay short."""
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


# --------------------------------------------------------------------------------------------- file system


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (never following it) or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_if_empty(path: Path) -> None:
    """Remove a working folder only if nothing is left in it (a failed run keeps what can be reused)."""
    try:
        path.rmdir()
    except OSError:
        pass


def resolve_source(given: Path | None) -> Path | None:
    """The absolute ``--from`` folder (None without ``--from``); it must be a directory."""
    if given is None:
        return None
    source = given.expanduser().resolve()
    if not source.is_dir():
        raise PrepareError(f"--from {given}: not a directory")
    return source


def place_folder(source: Path, out: Path, copy: bool) -> None:
    """Symlink (or copy) a ready folder as ``out``; a failed symlink points the user to ``--copy``."""
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


@dataclass
class Stage:
    """Where one prepared folder is built (``partial``) before it replaces ``target``; files fetched into
    ``downloads`` are listed in ``downloaded`` so that they can be removed after success."""

    target: Path
    partial: Path
    downloads: Path
    downloaded: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def staged(data_root: Path, name: str, keep_archives: bool, resume: bool = False) -> Iterator[Stage]:
    """Build ``DATA_ROOT/<name>`` in ``DATA_ROOT/.partial/<name>`` and move it into place only when the body
    (prepare + validate) succeeds, so a failed or interrupted run never leaves a half-made target.

    A leftover partial folder is removed first unless ``resume`` (then a failed run keeps it for the next).
    Finished downloads survive a failure; after success they are deleted unless ``keep_archives``."""
    stage = Stage(data_root / name, data_root / ".partial" / name, data_root / ".downloads" / name)
    if not (resume and stage.partial.is_dir() and not stage.partial.is_symlink()):
        remove_path(stage.partial)  # left over from an interrupted run
    stage.partial.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        yield stage
        if stage.target.exists() or stage.target.is_symlink():  # the caller has checked --force
            LOG.info("--force: removing the existing %s", stage.target)
            remove_path(stage.target)
        stage.partial.replace(stage.target)
        done = True
    finally:
        if resume and not done and stage.partial.is_dir():
            LOG.warning("the partial %s is kept in %s; run again to resume", name, stage.partial)
        else:
            remove_path(stage.partial)
        remove_if_empty(stage.partial.parent)
        remove_if_empty(stage.downloads)  # a failed run keeps finished downloads for the next try
        remove_if_empty(stage.downloads.parent)
    if not keep_archives:
        for path in stage.downloaded:
            path.unlink(missing_ok=True)
        remove_if_empty(stage.downloads)
        remove_if_empty(stage.downloads.parent)
    LOG.info("ready: %s", stage.target)


# ---------------------------------------------------------------------------------------------- downloads


def candidate_urls(remote: RemoteFile, url_env: str) -> list[str]:
    """The URLs to try in order; the environment variable ``url_env`` (a mirror or a test server holding every
    file by its plain name) replaces the published ones."""
    override = os.environ.get(url_env)
    if override:
        return [override.rstrip("/") + "/" + remote.filename]
    return [remote.base_url + name for name in remote.names]


def download(remote: RemoteFile, destination: Path, url_env: str, show_progress: bool, hint: str) -> Path:
    """Fetch ``remote`` to ``destination`` (via ``.part``); an existing complete file is reused.

    A 404 moves on to the next published name; any other failure is a PrepareError with exit code 2 that names
    the URL and ends with ``hint`` (how to run without network)."""
    if destination.is_file():
        LOG.info("using the already downloaded %s", destination)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    urls = candidate_urls(remote, url_env)
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


def find_local(folder: Path, remote: RemoteFile) -> Path | None:
    """A local copy of ``remote`` in ``folder`` under any of its published names."""
    for name in remote.names:
        if (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------------------------- extraction


def safe_relative(member_name: str) -> PurePosixPath | None:
    """The member's path relative to the extraction folder, or None if it would escape it."""
    path = PurePosixPath(member_name)
    parts = [part for part in path.parts if part not in ("", ".")]
    if path.is_absolute() or ".." in parts or not parts:
        return None
    return PurePosixPath(*parts)


def extract_jpegs(archive: Path, out_dir: Path, flatten: bool, show_progress: bool) -> int:
    """Extract the .jpg files of ``archive`` into ``out_dir`` (only base names if ``flatten``); members whose
    path would leave ``out_dir`` and non-files (links, devices) are skipped. Returns the number extracted."""
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
