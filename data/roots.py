"""Where data sets live: ``--data-root`` beats ``$DATA_ROOT`` beats ``./data``."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_ROOT = Path("data")


def resolve_data_root(cli_value: str | os.PathLike | None = None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get("DATA_ROOT")
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_ROOT
