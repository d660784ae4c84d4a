"""Saliency maps for the salient branch, pluggable by name.

``create_saliency(name)`` returns ``f(rgb uint8 (H, W, 3)) -> float32 (H, W) map in [0, 1]``. The paper
uses DSS (a VGG-based deep saliency network, not installable offline); the default here is OpenCV's
spectral residual saliency (Hou & Zhang), ``fine_grained`` is OpenCV's other static detector, and
``torchscript:PATH`` plugs in any saliency network exported with TorchScript (input (1, 3, H, W) RGB in
[0, 1], output (1, 1, h, w) or (1, h, w) map), e.g. a DSS export.
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
                f"`pip install opencv-contrib-python-headless`, or pick saliency: torchscript:PATH") from None
        detector = factory()

        def saliency(rgb: np.ndarray) -> np.ndarray:
            ok, result = detector.computeSaliency(np.ascontiguousarray(rgb[..., ::-1]))
            if not ok:
                raise RuntimeError("OpenCV saliency computation failed")
            return _normalise(cv2.resize(result, (rgb.shape[1], rgb.shape[0])))
        return saliency
    return build


def _torchscript(path: str) -> SaliencyFn:
    network = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def saliency(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        result = network(x)
        result = result if result.ndim == 4 else result[:, None]
        result = F.interpolate(result.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return _normalise(result[0, 0].numpy())
    return saliency


SALIENCY: dict[str, Callable[[], SaliencyFn]] = {
    "spectral_residual": _opencv("StaticSaliencySpectralResidual_create"),
    "fine_grained": _opencv("StaticSaliencyFineGrained_create"),
}


def create_saliency(name: str) -> SaliencyFn:
    if name.startswith("torchscript:"):
        return _torchscript(name.split(":", 1)[1])
    if name not in SALIENCY:
        raise UserError(f"unknown saliency method {name!r}; available: {', '.join(SALIENCY)}, torchscript:PATH")
    return SALIENCY[name]()
