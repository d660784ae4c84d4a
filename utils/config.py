"""YAML configs with dotted command-line overrides (``train.steps=100 model.head.out_dim=256``).

A run saves its final, fully resolved config beside its checkpoints, so it can be reproduced or resumed
without the original command line.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .files import atomic_write_text


class ConfigError(UserError):
    """A config file or an override is malformed."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a float (YAML 1.1, PyYAML's dialect, wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$|"
               r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:  # its text spans lines (context, caret); the CLI shows one
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``a.b=value`` sets config["a"]["b"]; the value is parsed as YAML (numbers, lists, null...)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r} (check the spelling against the config)")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: {error}") from None
    return config


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def save_yaml(config: dict, path: str | Path) -> None:
    """Written atomically: a run killed while saving keeps the previous file or the whole new one."""
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
