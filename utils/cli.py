"""Entry-point plumbing: logging set-up and turning the user's errors into one clear line.

Users should see ``error: cannot load image data/x.jpg: ...`` rather than a traceback from deep inside PIL
or torch. What counts as the user's error is explicit: a :class:`utils.errors.UserError` (a bad flag, config
value, file or file content, method or benchmark name; ``ConfigError``, ``ManifestError``, ``ImageLoadError``,
``ReleaseError``... derive from it), a :class:`RunStopped`, or a missing / already existing file. Every other
exception, a plain ``ValueError`` or ``KeyError`` included, is a bug and keeps its traceback.

Every script's ``main`` runs through :func:`run_cli`, the one place that sets up logging
(:func:`setup_logging`) and turns errors into an exit status: 2 for a user's error (or the error's
``exit_code``), 130 for Ctrl-C.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import sys
from typing import Callable, Iterator

from .errors import UserError
from .memory import bound_primitive_cache, reuse_freed_memory


class RunStopped(RuntimeError):
    """A run stopped on purpose (too many unreadable training images, a diverged loss...); the message says
    why and what was kept, in one line."""


class DiskFull(RunStopped):
    """The disk (or the user's quota) filled up while a run wrote a file; the message names the file and the
    command that continues the run."""


#: errno values of a full disk / an exhausted quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def full_disk_stops_the_run(doing: str, then: Callable[[], str]) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFull`: one line naming what was being written and
    ``then()`` (evaluated at the failure: what is intact and the exact command that continues), no traceback."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        target = f"writing {error.filename}" if error.filename else "writing"
        raise DiskFull(f"disk full while {doing} ({target}: {error.strerror or 'no space left on device'}); "
                       f"{then()}") from None


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran ``script`` (``python SCRIPT ARGS``), quoted for a shell, for "run it again" hints."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


#: Errors caused by inputs (flags, config, files, data) or a deliberate stop, reported in one line with exit
#: code 2. Not ``ValueError`` / ``KeyError``: raised by anything else, they are bugs and show their traceback.
USER_ERRORS = (UserError, RunStopped, FileNotFoundError, FileExistsError)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--image-size 0`` is an error, not "use the default")."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_at_least(text: str, low: int) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def setup_logging(level: str | None = None, quiet: bool = False, progress_to_stdout: bool = False) -> None:
    """The root logger: ``level`` (else ``$LOGLEVEL``, else INFO; WARNING when ``quiet``), timestamped lines on
    stderr. ``progress_to_stdout`` (the data preparation scripts): INFO lines go bare to stdout, warnings and
    errors to stderr."""
    level = "WARNING" if quiet else (level or os.environ.get("LOGLEVEL", "INFO")).upper()
    # FAISS's loader logs each CPU-specific build it could not import (a ModuleNotFoundError text) at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not progress_to_stdout:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(out)
    root.addHandler(err)


def error_line(error: BaseException) -> str:
    """The meaningful line of an error; DataLoader workers wrap the original in a traceback text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "cannot load image" in line:
            return line[line.index("cannot load image"):]
    return lines[-1] if lines else type(error).__name__


def run_cli(main: Callable[[], int | None], **logging_options) -> int:
    """Set up logging (``logging_options``: see :func:`setup_logging`), run ``main`` and return its exit status
    (None counts as 0); a user's error is one ``error: ...`` line on stderr and status 2 (or its
    ``exit_code``), Ctrl-C is ``interrupted`` and 130."""
    setup_logging(**logging_options)
    reuse_freed_memory()
    bound_primitive_cache()
    try:
        return main() or 0
    except USER_ERRORS as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def benchmark_main(parse_args: Callable, run: Callable, report: Callable, argv=None) -> int:
    """``main`` of a benchmark script: parse the flags, run, print the report, and write the measurements to
    ``--json`` when given."""
    import json

    from .files import atomic_write_text

    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0
