"""``load_release(path) -> Retriever``: rebuild a released network without any training code.

Nothing is unpickled: a release is JSON + safetensors (its SHA-256 checked first); a training checkpoint
(``.pth``, also accepted) is read with ``torch.load(weights_only=True)``, which refuses pickled code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from msretrieval.models.backbones import Preprocessing
from msretrieval.models.retrieval_net import RetrievalNet, load_model, model_from_config, read_model_checkpoint
from msretrieval.utils.files import sha256_file

from .format import CONFIG_FILE, ReleaseError, read_config, verify_weights
from .retriever import Retriever


def model_from_release(directory: Path, config: dict) -> RetrievalNet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = verify_weights(directory, config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ReleaseError(f"cannot read {weights}: {error}") from None
    model = model_from_config(config["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ReleaseError(f"{weights} does not fit the network of {directory / CONFIG_FILE}: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    spec = config["input"]
    model.backbone.preprocessing = Preprocessing(mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                                                 input_size=int(spec["image_size"]))
    return model.eval()


def release_config(model_config: dict, resize: str = "shorter") -> dict:
    """The release config (no training or evaluation record) of a network described by ``model.config()``,
    as a training checkpoint stores it."""
    pre = model_config["preprocessing"]
    return {"model": {k: v for k, v in model_config.items() if k not in ("preprocessing", "out_dim")},
            "input": {"mean": list(pre["mean"]), "std": list(pre["std"]), "image_size": pre["input_size"],
                      "resize": resize, "interpolation": "bilinear"},
            "descriptor": _descriptor(model_config)}


def _descriptor(model_config: dict) -> dict:
    bits = model_config.get("head", {}).get("hash_bits")
    if bits:  # packed sign codes, most significant bit first (numpy.packbits)
        return {"dim": bits // 8, "dtype": "uint8", "bits": bits, "binary": True, "similarity": "hamming"}
    return {"dim": model_config["out_dim"], "dtype": "float32", "normalisation": "l2",
            "similarity": "inner_product", "binary": False}


def describe_release(path: str | Path) -> dict:
    """The release config (``model``, ``input``, ...) of a release directory or a training checkpoint,
    without building the network."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pth":
        return release_config(read_model_checkpoint(path)["config"])
    return read_config(path.parent if path.is_file() and path.name == CONFIG_FILE else path)


def load_release(path: str | Path, device: str | torch.device = "cpu") -> Retriever:
    """A :class:`Retriever` from a release directory (or its config.json), or from a training checkpoint
    (``best.pth`` / ``last.pth``, encoded at its backbone's input size, shorter side)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pth":
        model = load_model(path)  # weights_only: a pickle that would run code is refused (UnsafeCheckpointError)
        return Retriever(model, {**release_config(model.config()), "weights_sha256": sha256_file(path)}, device)
    directory = path.parent if path.is_file() and path.name == CONFIG_FILE else path
    if not directory.is_dir():
        raise ReleaseError(f"release not found: {path} (a directory made by scripts/export.py, or a .pth)")
    config = read_config(directory)
    return Retriever(model_from_release(directory, config), config, device)
