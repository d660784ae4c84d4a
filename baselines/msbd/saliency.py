"""Saliency maps for the salient branch, pluggable by name.

``create_saliency(name)`` returns ``f(rgb uint8 (H, W, 3)) -> float32 (H, W) map in [0, 1]``. The paper
uses DSS (a VGG-based deep saliency network, not installable offline); the default here is OpenCV's
spectral residual saliency (Hou & Zhang), ``fine_grained`` is OpenCV's other static detector, and
``network:MODULE:FACTORY@WEIGHTS`` plugs in any saliency network, e.g. a DSS port: ``MODULE.FACTORY()`` (an
importable function, code the user installed) builds the ``nn.Module`` (input (1, 3, H, W) RGB in [0, 1],
output (1, 1, h, w) or (1, h, w) map) and WEIGHTS, its state dict, is loaded into it.

Why not a TorchScript (or ``torch.export``) file: loading one from a path runs what the file says (TorchScript
code, pickled objects), so a downloaded file could execute code. WEIGHTS is tensors only: a ``.safetensors``
file, or a ``.pt`` / ``.pth`` state dict read with ``torch.load(weights_only=True)``; anything else is refused.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from msretrieval.utils.errors import UserError

SaliencyFn = Callable[[np.ndarray], np.ndarray]


def _normalise(saliency: np.ndarray) -> np.ndarray:
    saliency = saliency.astype(np.float32)
    low, high = float(saliency.min()), float(saliency.max())
    if high - low < 1e-12:
        return np.ones_like(saliency)  # a flat map keeps the whole image rather than erasing it
    return (saliency - low) / (high - low)


class SaliencyUnavailable(UserError, ImportError):
    """OpenCV's saliency module (opencv-contrib) is missing: only the salient branch needs it."""


def _opencv(factory_name: str) -> Callable[[], SaliencyFn]:
    """OpenCV's static saliency detector ``cv2.saliency.<factory_name>``, looked up only when built, so that a
    missing opencv-contrib breaks the salient branch alone (not ``gem``, not ``--help``)."""
    def build() -> SaliencyFn:
        try:
            import cv2
            factory = getattr(cv2.saliency, factory_name)
        except (ImportError, AttributeError) as error:
            raise SaliencyUnavailable(
                f"MSBD's default saliency needs OpenCV's contrib modules ({error}); install them with "
                f"`pip install opencv-contrib-python-headless`, or pick saliency: "
                f"{NETWORK}MODULE:FACTORY@WEIGHTS") from None
        detector = factory()

        def saliency(rgb: np.ndarray) -> np.ndarray:
            ok, result = detector.computeSaliency(np.ascontiguousarray(rgb[..., ::-1]))
            if not ok:
                raise RuntimeError("OpenCV saliency computation failed")
            return _normalise(cv2.resize(result, (rgb.shape[1], rgb.shape[0])))
        return saliency
    return build


NETWORK = "network:"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _network(spec: str) -> SaliencyFn:
    """``MODULE:FACTORY@WEIGHTS`` -> the saliency function of ``MODULE.FACTORY()`` holding WEIGHTS."""
    import importlib

    target, _, weights = spec.partition("@")
    module_name, _, factory_name = target.partition(":")
    if not (module_name and factory_name and weights):
        raise UserError(f"saliency {NETWORK}{spec!r} must read {NETWORK}MODULE:FACTORY@WEIGHTS "
                        f"(e.g. {NETWORK}mypackage.dss:build@dss.safetensors)")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"saliency network factory {module_name}:{factory_name} cannot be imported ({error})") from None
    network = factory()
    if not isinstance(network, torch.nn.Module):
        raise UserError(f"{module_name}:{factory_name}() returned a {type(network).__name__}, not a torch nn.Module")
    network.load_state_dict(_read_state_dict(weights, network))
    network.eval()

    @torch.no_grad()
    def saliency(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
        result = network(x)
        result = result if result.ndim == 4 else result[:, None]
        result = F.interpolate(result.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return _normalise(result[0, 0].numpy())
    return saliency


def _read_state_dict(path: str, network: torch.nn.Module) -> dict:
    """Tensors only (nothing in the file can run), checked to fit ``network`` key for key."""
    from msretrieval.models.retrieval_net import read_checkpoint

    if not path.endswith(WEIGHT_SUFFIXES):
        raise UserError(f"saliency weights {path}: expected a state dict ({', '.join(WEIGHT_SUFFIXES)}); save "
                        f"the network's state_dict() with safetensors (TorchScript files are refused: they run code)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read saliency weights {path}: {error}") from None
    else:
        state = read_checkpoint(path)  # refuses pickled objects with a one-line UserError
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"saliency weights {path} are not a state dict (name -> tensor)")
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise UserError(f"saliency weights {path} do not fit the network: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, other shapes {wrong[:5]}")
    return state

SALIENCY: dict[str, Callable[[], SaliencyFn]] = {
    "spectral_residual": _opencv("StaticSaliencySpectralResidual_create"),
    "fine_grained": _opencv("StaticSaliencyFineGrained_create"),
}


def create_saliency(name: str) -> SaliencyFn:
    if name.startswith(NETWORK):
        return _network(name[len(NETWORK):])
    if name.startswith("torchscript:"):
        raise UserError(f"saliency {name!r}: TorchScript files are no longer loaded (loading one runs code from "
                        f"the file); use {NETWORK}MODULE:FACTORY@WEIGHTS with the network's state dict")
    if name not in SALIENCY:
        raise UserError(f"unknown saliency method {name!r}; available: {', '.join(SALIENCY)}, "
                        f"{NETWORK}MODULE:FACTORY@WEIGHTS")
    return SALIENCY[name]()
