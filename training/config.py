"""Run configuration: ``configs/default.yaml`` holds every key (and its default); a run's YAML and its
command-line overrides change values of those keys only, so a typo or a stray key is an error instead of a
silently ignored setting. The fully resolved config is saved beside the run's checkpoints.
"""
from __future__ import annotations

import logging
from pathlib import Path

from utils.config import ConfigError, apply_overrides, load_yaml

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
#: Sections whose keys are free-form or lists (not checked key by key against the defaults).
_OPAQUE = {("mining", "schedule"), ("model", "trainable"), ("eval", "baselines"), ("data", "crop_scale"),
           ("mining", "loss_band")}


def merge(defaults: dict, given: dict, path: tuple[str, ...] = ()) -> dict:
    """``given`` over ``defaults``, recursively; a key absent from the defaults is an error."""
    merged = dict(defaults)
    for key, value in given.items():
        where = ".".join((*path, key))
        if key not in defaults:
            raise ConfigError(f"unknown config key {where!r}; known keys here: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, dict) and (*path, key) not in _OPAQUE:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a section (mapping), got {value!r}")
            merged[key] = merge(default, value, (*path, key))
        else:
            merged[key] = value
    return merged


def check_types(config: dict, defaults: dict, path: tuple[str, ...] = ()) -> None:
    """Each value has its default's type (an int where a float is expected is fine; null defaults accept
    anything)."""
    for key, default in defaults.items():
        value, where = config[key], ".".join((*path, key))
        if isinstance(default, dict) and (*path, key) not in _OPAQUE:
            check_types(value, default, (*path, key))
        elif default is not None and value is not None:
            expected = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
                raise ConfigError(f"config key {where!r} must be {type(default).__name__}, got {value!r}")


def resolve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                   base: dict | None = None, init_from: str | Path | None = None) -> dict:
    """Defaults <- the YAML at ``path`` (or a saved config ``base``) <- ``key.sub=value`` overrides <-
    ``init_from`` (``model.init_from``, then the release's network is adopted)."""
    defaults = load_yaml(DEFAULT_CONFIG)
    given = base if base is not None else (load_yaml(path) if path is not None else {})
    config = apply_overrides(merge(defaults, given), overrides or [])
    if init_from is not None:
        config["model"]["init_from"] = str(init_from)
    check_types(config, defaults)
    validate(config)
    return adopt_release(config)


def adopt_release(config: dict) -> dict:
    """``model.init_from``: the network of a release (or a training checkpoint) replaces the config's
    architecture, backbone and head (projection/whitening included), and its input size the evaluation's, so
    the saved config describes the network that is actually fine-tuned. The one head option a float release
    leaves to the config is ``hash_bits``: a hashing layer added on top (fine-tuning it into a hashing net)."""
    source = config["model"]["init_from"]
    if not source:
        return config
    from release.load import describe_release

    described = describe_release(source)
    model, head = described["model"], config["model"]["head"]
    config["model"] = {**config["model"], "architecture": model["architecture"], "backbone": model["backbone"],
                       "pretrained": False, "weights": None,
                       "head": {**head, "out_dim": None, "whiten": False, **model["head"]}}
    config["eval"] = {**config["eval"], "image_size": int(described["input"]["image_size"])}
    log.info("fine-tuning %s on %s from %s", model["architecture"], model["backbone"], source)
    return config


def validate(config: dict) -> None:
    """Values that cannot work, caught before any image is read or a model is built."""
    from losses import LOSS_NAMES
    from miners import MINER_NAMES
    from models.retrieval_net import available_models

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    mining, train, data = config["mining"], config["train"], config["data"]
    need(mining["miner"] in MINER_NAMES, f"mining.miner must be one of {MINER_NAMES}, got {mining['miner']!r}")
    need(config["loss"]["name"] in LOSS_NAMES, f"loss.name must be one of {LOSS_NAMES}")
    need(config["model"]["architecture"] in available_models(),
         f"model.architecture must be one of {available_models()}")
    for key in ("steps", "grad_accum", "log_every", "checkpoint_every", "triplets_per_step"):
        need(train[key] >= 1, f"train.{key} must be >= 1, got {train[key]}")
    need(train["eval_every"] >= 0 and train["triplet_grid_every"] >= 0, "train.eval_every and "
         "train.triplet_grid_every must be >= 0 (0: never)")
    need(train["mixed_precision"] in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
    need(mining["classes_per_batch"] >= 2 and mining["images_per_class"] >= 2,
         "mining.classes_per_batch and mining.images_per_class must be >= 2 (a triplet needs a positive and a "
         "negative class)")
    need(mining["classes"] >= 2 and mining["per_class"] >= 2, "mining.classes and mining.per_class must be >= 2")
    need(data["val_classes"] >= 0, "data.val_classes must be >= 0")
    need(data["train_size"] >= 32, f"data.train_size must be >= 32 pixels, got {data['train_size']}")
    scale = data["crop_scale"]
    need(isinstance(scale, list) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
         f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    source = config["model"]["init_from"]
    need(source is None or (isinstance(source, str) and Path(source).exists()),
         f"model.init_from: {source!r} not found (a release directory made by scripts/export.py, or a .pth)")
    loss, bits = config["loss"], config["model"]["head"]["hash_bits"]
    need(bits is None or (bits >= 8 and bits % 8 == 0),
         f"model.head.hash_bits must be a positive multiple of 8 (codes are packed in bytes), got {bits}")
    need(bits is not None or (loss["name"] not in ("csq", "dpsh") and loss["quantization_weight"] is None
                              and loss["balance_weight"] is None),
         f"loss.name={loss['name']}, loss.quantization_weight and loss.balance_weight train hash codes: "
         "set model.head.hash_bits")
    need(loss["name"] not in ("csq", "dpsh") or (loss["balance_weight"] is None and mining["miner"] != "algorithm1"),
         f"the {loss['name']} loss takes no loss.balance_weight and no triplets (use mining.miner=batch: "
         "class-balanced batches)")
    need(isinstance(config["model"]["trainable"], list) and config["model"]["trainable"],
         "model.trainable must be a non-empty list of module names (or [all])")


def unique_run_dir(path: str | Path) -> Path:
    """``path`` if it is new or empty, else the first free ``path-2``, ``path-3``...: a run never writes into
    (or evaluates the checkpoints of) an earlier run. ``--resume`` continues a run in its own directory."""
    path = Path(path)
    candidate, number = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    if candidate != path:
        log.warning("run directory %s is not empty; this run writes to %s", path, candidate)
    return candidate
