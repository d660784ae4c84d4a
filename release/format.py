"""What a release directory holds and how its config is checked (shared by export and load)."""
from __future__ import annotations

import json
from pathlib import Path

from msretrieval.utils.errors import UserError
from msretrieval.utils.files import sha256_file

RELEASE_FORMAT = "msretrieval-release-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
GRAPH_FILE = "model.pt2"

#: keys config.json must have, and the keys its "model" and "input" entries must have
REQUIRED = {"format", "model", "input", "descriptor", "weights_sha256"}
REQUIRED_MODEL = {"architecture", "backbone", "tap", "head"}
REQUIRED_INPUT = {"mean", "std", "image_size", "resize"}


class ReleaseError(UserError):
    """A release directory is incomplete, corrupt or of another format; the message names the file."""


def read_config(directory: Path) -> dict:
    """config.json of a release, checked for the format and the keys loading needs."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} not found: a release directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                           "(made by scripts/export.py)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReleaseError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != RELEASE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ReleaseError(f"{path}: format {found!r}, expected {RELEASE_FORMAT!r}")
    for where, entry, required in (("", config, REQUIRED), ("model.", config.get("model"), REQUIRED_MODEL),
                                   ("input.", config.get("input"), REQUIRED_INPUT)):
        missing = sorted(required - set(entry)) if isinstance(entry, dict) else sorted(required)
        if missing:
            raise ReleaseError(f"{path}: missing {', '.join(where + key for key in missing)}")
    return config


def verify_weights(directory: Path, config: dict) -> Path:
    """The weights file, after checking its SHA-256 against config.json (a flipped byte is refused)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} not found")
    actual = sha256_file(path)
    if actual != config["weights_sha256"]:
        raise ReleaseError(f"checksum mismatch for {path}: SHA-256 {actual}, config.json says "
                           f"{config['weights_sha256']} (the file is corrupt or not this release's)")
    return path
