"""Where data sets live: ``--data-root`` beats ``$DATA_ROOT`` beats the first search root that holds the set.

Without a flag or ``$DATA_ROOT``, a data set is looked for in :data:`SEARCH_ROOTS`, in order: ``../shared/data``
(a copy shared by several checkouts), ``./data`` (sets put there by hand or by older versions; ``./data`` is
also the ``data`` Python package, so nothing is downloaded into it) and ``./datasets``, where downloads go
(:data:`DOWNLOAD_ROOT`, not a source package). When no root holds the set, the answer is ``./datasets``, where
``scripts/prepare_flowers102.py`` puts it. The Makefile's ``FIND_DATA`` follows the same order.
"""
from __future__ import annotations

import os
from pathlib import Path

#: where the preparation scripts download and build data sets without --data-root / $DATA_ROOT
DOWNLOAD_ROOT = Path("datasets")
#: looked in, in order, for a data set when neither --data-root nor $DATA_ROOT is given
SEARCH_ROOTS = (Path("../shared/data"), Path("data"), DOWNLOAD_ROOT)
#: the set that decides the root when a caller names none (the project's training and evaluation data)
DEFAULT_DATASET = "flowers102"


def given_data_root(cli_value: str | os.PathLike | None = None) -> Path | None:
    """``--data-root`` if given, else ``$DATA_ROOT``, else None."""
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get("DATA_ROOT")
    return Path(env).expanduser() if env else None


def resolve_data_root(cli_value: str | os.PathLike | None = None, dataset: str = DEFAULT_DATASET) -> Path:
    """The root to read ``dataset`` from: the given one, else the first of :data:`SEARCH_ROOTS` holding a
    ``dataset`` folder, else :data:`DOWNLOAD_ROOT`."""
    given = given_data_root(cli_value)
    if given is not None:
        return given
    return next((root for root in SEARCH_ROOTS if (root / dataset).is_dir()), DOWNLOAD_ROOT)


def download_root(cli_value: str | os.PathLike | None = None) -> Path:
    """Where a preparation script writes: the given root, else :data:`DOWNLOAD_ROOT` (never the ``data``
    package, never a shared copy)."""
    given = given_data_root(cli_value)
    return DOWNLOAD_ROOT if given is None else given
