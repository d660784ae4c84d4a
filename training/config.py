"""Run configuration: ``configs/default.yaml`` holds every key (and its default); a run's YAML and its
command-line overrides change values of those keys only, so a typo or a stray key is an error instead of a
silently ignored setting. The fully resolved config is saved beside the run's checkpoints.
"""
from __future__ import annotations

import logging
from pathlib import Path

from msretrieval.utils.config import ConfigError, apply_overrides, load_yaml

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
#: Sections whose keys are free-form or lists (not checked key by key against the defaults).
_OPAQUE = {("mining", "schedule"), ("model", "trainable"), ("eval", "baselines"), ("data", "crop_scale"),
           ("mining", "loss_band"), ("eval", "scales")}


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


#: Keys with a non-null default that also take null (its meaning is in configs/default.yaml).
_NULLABLE = {("train", "forward_chunk"), ("optim", "head_lr"), ("eval", "cache_dir")}
#: The type of keys whose default is null.
_NULL_DEFAULT_TYPES = {("data", "root"): str, ("model", "weights"): str, ("model", "init_from"): str,
                       ("model", "head", "out_dim"): int, ("model", "head", "hash_bits"): int,
                       ("loss", "quantization_weight"): float, ("loss", "balance_weight"): float,
                       ("loss", "distill_weight"): float, ("model", "hash_beta", "gamma"): float,
                       ("model", "hash_beta", "final"): float,
                       ("eval", "limit"): int}


def check_types(config: dict, defaults: dict, path: tuple[str, ...] = ()) -> None:
    """Each value has its default's type (an int where a float is expected is fine); null only where the
    default is null or null has a meaning (``_NULLABLE``); keys with a null default have the type of
    ``_NULL_DEFAULT_TYPES`` (or are checked by :func:`validate`)."""
    for key, default in defaults.items():
        value, where, here = config[key], ".".join((*path, key)), (*path, key)
        if isinstance(default, dict) and here not in _OPAQUE:
            check_types(value, default, here)
            continue
        if default is None:
            default = {str: "", int: 0, float: 0.0}[_NULL_DEFAULT_TYPES[here]] if here in _NULL_DEFAULT_TYPES else None
            if default is None or value is None:
                continue
        elif value is None:
            if here in _NULLABLE:
                continue
            raise ConfigError(f"config key {where!r} must be {type(default).__name__}, got null")
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
    from msretrieval.release.load import describe_release

    described = describe_release(source)
    model, head = described["model"], config["model"]["head"]
    config["model"] = {**config["model"], "architecture": model["architecture"], "backbone": model["backbone"],
                       "pretrained": False, "weights": None,
                       "head": {**head, "out_dim": None, "whiten": False, **model["head"]}}
    config["eval"] = {**config["eval"], "image_size": int(described["input"]["image_size"])}
    log.info("fine-tuning %s on %s from %s", model["architecture"], model["backbone"], source)
    return config


TRAINING_SETS = "flowers102[:SPLIT], csv:PATH[:SPLIT] or gldv2:PATH"
BENCHMARKS = "flowers102, flowers102-clutter, csv:PATH[:SPLIT] or revisitop:NAME"


def validate(config: dict) -> None:
    """Values that cannot work, caught before any image is read or a model is built. Each message names the
    key, the value and what is accepted. (Checks that need the data: :func:`check_inputs`.)"""
    from msretrieval.losses import LOSS_NAMES
    from msretrieval.miners import MINER_NAMES, MiningSchedule
    from msretrieval.models.hashing import BetaSchedule
    from msretrieval.models.retrieval_net import available_models

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    mining, train, data = config["mining"], config["train"], config["data"]
    optim, ecfg = config["optim"], config["eval"]
    model, head = config["model"], config["model"]["head"]
    need(isinstance(config["run_dir"], str) and config["run_dir"].strip() != "", "run_dir must be a folder name")
    need(config["seed"] >= 0, f"seed must be >= 0, got {config['seed']}")
    need(mining["miner"] in MINER_NAMES, f"mining.miner must be one of {list(MINER_NAMES)}, got {mining['miner']!r}")
    need(config["loss"]["name"] in LOSS_NAMES,
         f"loss.name must be one of {list(LOSS_NAMES)}, got {config['loss']['name']!r}")
    need(model["architecture"] in available_models(),
         f"model.architecture must be one of {available_models()}, got {model['architecture']!r}")
    for key in ("steps", "grad_accum", "log_every", "checkpoint_every", "triplets_per_step", "max_bad_steps",
                "keep_checkpoints"):
        need(train[key] >= 1, f"train.{key} must be >= 1, got {train[key]}")
    need(isinstance(train["collective_timeout"], (int, float)) and train["collective_timeout"] > 0,
         f"train.collective_timeout must be a number of seconds > 0, got {train['collective_timeout']!r}")
    for key in ("eval_every", "triplet_grid_every"):
        need(train[key] >= 0, f"train.{key} must be >= 0 (0: never), got {train[key]}")
    need(train["forward_chunk"] is None or train["forward_chunk"] >= 1,
         f"train.forward_chunk must be >= 1 or null (a whole shard), got {train['forward_chunk']}")
    need(train["mixed_precision"] in ("no", "fp16", "bf16"),
         f"train.mixed_precision must be one of ['no', 'fp16', 'bf16'], got {train['mixed_precision']!r}")
    need(mining["classes_per_batch"] >= 2 and mining["images_per_class"] >= 2,
         "mining.classes_per_batch and mining.images_per_class must be >= 2 (a triplet needs a positive and a "
         f"negative class), got {mining['classes_per_batch']} x {mining['images_per_class']}")
    need(mining["classes"] >= 2 and mining["per_class"] >= 2,
         f"mining.classes and mining.per_class must be >= 2, got {mining['classes']} x {mining['per_class']}")
    need(mining["refresh_every"] >= 1, f"mining.refresh_every must be >= 1, got {mining['refresh_every']}")
    need(mining["memory"] >= 0, f"mining.memory must be >= 0 (0: none), got {mining['memory']}")
    need(mining["miner"] != "algorithm1" or train["triplets_per_step"] % train["grad_accum"] == 0,
         f"train.triplets_per_step ({train['triplets_per_step']}) must be a multiple of train.grad_accum "
         f"({train['grad_accum']}): a step's triplets are split evenly over its micro-batches")
    try:
        MiningSchedule.from_config({"phases": mining["schedule"], "refresh_every": mining["refresh_every"]})
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"mining.schedule: {error} (a list of phases {{until_step, semi_hard_probability, "
                          f"hard_threshold, refresh_every}}, the last without until_step)") from None
    band = mining["loss_band"]
    need(band is None or (isinstance(band, list) and len(band) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in band) and band[0] < band[1]),
         f"mining.loss_band must be null or [low, high] with low < high, got {band!r}")
    need(data["train"].partition(":")[0] in ("flowers102", "csv", "gldv2"),
         f"data.train must be {TRAINING_SETS}, got {data['train']!r}")
    need(data["val_classes"] >= 0, f"data.val_classes must be >= 0, got {data['val_classes']}")
    need(data["train_size"] >= 32, f"data.train_size must be >= 32 pixels, got {data['train_size']}")
    need(data["workers"] >= 0, f"data.workers must be >= 0, got {data['workers']}")
    need(0.0 <= data["max_bad_fraction"] <= 1.0,
         f"data.max_bad_fraction must be in [0, 1] (0: any unreadable training image stops the run), got "
         f"{data['max_bad_fraction']}")
    scale = data["crop_scale"]
    need(isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
         and 0 < scale[0] <= scale[1] <= 1,
         f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    source = model["init_from"]
    need(source is None or (isinstance(source, str) and Path(source).exists()),
         f"model.init_from: {source!r} not found (a release directory made by scripts/export.py, or a .pth)")
    need(model["init_images"] >= 1, f"model.init_images must be >= 1, got {model['init_images']}")
    need(head["num_clusters"] >= 1, f"model.head.num_clusters must be >= 1, got {head['num_clusters']}")
    need(head["p"] > 0, f"model.head.p must be > 0, got {head['p']}")
    need(head["out_dim"] is None or head["out_dim"] >= 1,
         f"model.head.out_dim must be >= 1 or null (no projection), got {head['out_dim']}")
    try:
        BetaSchedule.from_config(model["hash_beta"], train["steps"])
    except ValueError as error:
        raise ConfigError(f"model.hash_beta: {error} (got {model['hash_beta']})") from None
    loss, bits = config["loss"], head["hash_bits"]
    need(loss["margin"] >= 0, f"loss.margin must be >= 0, got {loss['margin']}")
    for key in ("quantization_weight", "balance_weight", "distill_weight"):
        need(loss[key] is None or loss[key] >= 0, f"loss.{key} must be >= 0 or null, got {loss[key]}")
    need(bits is None or (bits >= 8 and bits % 8 == 0),
         f"model.head.hash_bits must be a positive multiple of 8 (codes are packed in bytes), got {bits}")
    need(bits is not None or (loss["name"] not in ("csq", "dpsh") and loss["quantization_weight"] is None
                              and loss["balance_weight"] is None and loss["distill_weight"] is None),
         f"loss.name={loss['name']}, loss.quantization_weight, loss.balance_weight and loss.distill_weight train "
         "hash codes: set model.head.hash_bits")
    need(loss["name"] not in ("csq", "dpsh") or (loss["balance_weight"] is None and mining["miner"] != "algorithm1"),
         f"the {loss['name']} loss takes no loss.balance_weight and no triplets (use mining.miner=batch: "
         "class-balanced batches)")
    trainable = model["trainable"]
    need(isinstance(trainable, list) and trainable and all(isinstance(name, str) for name in trainable),
         f"model.trainable must be a non-empty list of module names (or [all]), got {trainable!r}")
    for key in ("lr", "weight_decay"):
        need(optim[key] >= 0, f"optim.{key} must be >= 0, got {optim[key]}")
    need(optim["head_lr"] is None or optim["head_lr"] >= 0,
         f"optim.head_lr must be >= 0 or null (optim.lr), got {optim['head_lr']}")
    need(optim["warmup_steps"] >= 0, f"optim.warmup_steps must be >= 0, got {optim['warmup_steps']}")
    need(optim["scheduler"] in ("cosine", "constant"),
         f"optim.scheduler must be one of ['cosine', 'constant'], got {optim['scheduler']!r}")
    benchmark = ecfg["benchmark"]
    need(benchmark in ("flowers102", "flowers102-clutter") or benchmark.startswith(("csv:", "revisitop:")),
         f"eval.benchmark must be {BENCHMARKS}, got {benchmark!r}")
    need(ecfg["image_size"] >= 32, f"eval.image_size must be >= 32 pixels, got {ecfg['image_size']}")
    need(ecfg["batch_size"] >= 1, f"eval.batch_size must be >= 1, got {ecfg['batch_size']}")
    need(ecfg["workers"] >= 0, f"eval.workers must be >= 0, got {ecfg['workers']}")
    need(ecfg["limit"] is None or ecfg["limit"] >= 1, f"eval.limit must be >= 1 or null (all), got {ecfg['limit']}")
    scales = ecfg["scales"]
    need(isinstance(scales, list) and scales and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and v > 0 for v in scales) and len(set(scales)) == len(scales),
         f"eval.scales must be a list of distinct positive numbers, got {scales!r}")
    baselines = ecfg["baselines"]
    need(isinstance(baselines, list) and all(isinstance(name, str) for name in baselines),
         f"eval.baselines must be a list of method names, got {baselines!r}")


def check_inputs(config: dict, data_root: str | Path, final_eval: bool = True):
    """The checks that need the data, run before any image is read or a model is built: the training set and
    (``final_eval``) the benchmark exist under ``data_root``, the baselines exist, the training classes
    (validation classes held out) can fill the configured batches, and (``final_eval``) no training image is
    one of the benchmark's images (:func:`refuse_training_on_benchmark_images`). Reads the manifests (and the
    bytes of files of equal sizes) only; returns the training set (``training.data.load_training_set``)."""
    import numpy as np

    from .data import load_training_set, split_validation_classes

    data_root = Path(data_root)
    data, mining, ecfg = config["data"], config["mining"], config["eval"]

    def where_flowers(key: str, value: str) -> None:
        labels = data_root / "flowers102" / "labels.csv"
        if not labels.is_file():
            raise ConfigError(f"{key} = {value!r} needs {labels}, which does not exist: the data root is {data_root} "
                              "(set it with --data-root, $DATA_ROOT or data.root; scripts/prepare_flowers102.py "
                              "builds the pack)")

    def where_file(key: str, value: str, path: str) -> None:
        if not Path(path).is_file():
            raise ConfigError(f"{key} = {value!r}: {path} not found")

    kind, _, rest = data["train"].partition(":")
    if kind == "flowers102":
        where_flowers("data.train", data["train"])
    else:
        where_file("data.train", data["train"], rest.partition(":")[0] if kind == "csv" else rest)
    if final_eval:
        benchmark = ecfg["benchmark"]
        if benchmark in ("flowers102", "flowers102-clutter"):
            where_flowers("eval.benchmark", benchmark)
        elif benchmark.startswith("csv:"):
            where_file("eval.benchmark", benchmark, benchmark[4:].partition(":")[0])
        else:
            name = benchmark.partition(":")[2]
            where_file("eval.benchmark", benchmark, str(data_root / name / f"gnd_{name}.pkl"))
        if ecfg["baselines"]:
            from msretrieval.retrieval.evaluation.catalogue import available_methods

            unknown = [name for name in ecfg["baselines"] if name not in available_methods()]
            if unknown:
                raise ConfigError(f"eval.baselines: unknown method(s) {unknown}; available: {available_methods()}")
    images = load_training_set(data["train"], data_root)
    fit = split_validation_classes(images, data["val_classes"], int(config["seed"]))[0]
    sizes = np.unique(np.asarray(fit.labels), return_counts=True)[1]
    usable = int((sizes >= 2).sum())  # a class needs two images to give a positive
    largest = int(sizes.max()) if len(sizes) else 0
    held_out = f" once data.val_classes = {data['val_classes']} are held out" if data["val_classes"] else ""
    if mining["miner"] == "algorithm1":
        if usable < 2:
            raise ConfigError(f"mining.miner = algorithm1 needs 2 training classes with 2 or more images; "
                              f"{images.name} has {usable}{held_out}")
        pairs = (("mining.per_class", mining["per_class"]),)
    else:
        if mining["classes_per_batch"] > usable:
            raise ConfigError(f"mining.classes_per_batch = {mining['classes_per_batch']}, but {images.name} has "
                              f"{usable} classes with 2 or more images{held_out}: use at most {usable}")
        pairs = (("mining.images_per_class", mining["images_per_class"]),)
    for key, value in pairs:
        if value > largest:
            raise ConfigError(f"{key} = {value}, but no training class of {images.name} has more than {largest} "
                              f"images (every class would repeat images): use at most {largest}")
    if final_eval:
        refuse_training_on_benchmark_images(images, data["train"], ecfg["benchmark"], data_root)
    return images


def refuse_training_on_benchmark_images(images, train_spec: str, benchmark: str, data_root: Path) -> None:
    """One line (:class:`data.overlap.SharedImagesError`) if a training image is one of the evaluation
    benchmark's database or query images, by path or by identical bytes: the final table would then measure
    memorisation. Reads only files whose byte size occurs on both sides."""
    from msretrieval.data.overlap import refuse_shared_images
    from msretrieval.retrieval.evaluation.benchmarks import benchmark_test_images

    refuse_shared_images(images.paths, benchmark_test_images(benchmark, data_root),
                         what=f"the training set data.train = {train_spec}",
                         against=f"the evaluation benchmark eval.benchmark = {benchmark}",
                         advice="Train on images the benchmark does not evaluate (csv:PATH:train keeps a manifest's "
                                "train rows), or evaluate on another benchmark")


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
