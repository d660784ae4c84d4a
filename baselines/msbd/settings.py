"""MSBD settings: defaults sized for a 2-core CPU, the paper's values in ``configs/msbd_paper.yaml``.

Methods read ``$MSBD_CONFIG`` (a YAML file of any of these fields) when they are built; unset, the
defaults below apply. Every field is part of the methods' config, hence of the descriptor cache key.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from msretrieval.utils.config import ConfigError, load_yaml

CONFIG_ENV = "MSBD_CONFIG"


@dataclass(frozen=True)
class MSBDSettings:
    # global branch: FEN at these scales of the input, averaged (paper: 1.25, 1, 0.75)
    scales: tuple[float, ...] = (1.25, 1.0, 0.75)
    # object branch
    proposals: str = "selective_search"       # selective_search | edge_boxes | grid (see proposals.py)
    selective_search_mode: str = "single"      # single | fast | quality
    edge_model: str | None = None              # structured-edge model file: switches to EdgeBoxes (paper)
    proposal_side: int = 112                   # shorter side of the image the detector sees at scale 1
    proposal_scales: tuple[float, ...] = (1.25, 1.0, 0.75)
    patches: int = 6                           # paper: 50
    patch_size: int = 112                      # paper: 340
    min_box_area: float = 0.02                 # boxes below this fraction of the image are dropped
    patch_dim: int = 64                        # PCA of patch descriptors before VLAD (keeps K*d tractable)
    codebook: int = 200
    nearest_words: int = 10
    # salient branch
    saliency: str = "spectral_residual"        # spectral_residual | fine_grained | torchscript:PATH
    saliency_size: int = 224                   # the detector sees a square of this side (paper: 500)
    # fusion
    branch_dims: int = 512                     # D1: PCA dims per branch
    # training images used for fitting (PCA, codebook, classifier); None: the whole train split
    fit_images: int | None = 1000
    # class-probability head and optional fine-tuning of the FEN as a classifier
    classifier_steps: int = 300
    finetune_steps: int = 0                    # > 0: fine-tune the backbone first (slow on CPU)
    finetune_lr: float = 0.001
    finetune_batch: int = 8
    # binary learning (Algorithm 1)
    density: float = 0.3                       # k / L
    alpha: float = 0.001
    iterations: int = 50
    itq_iterations: int = 50
    sparsify: str = "exact"                    # exact | random (the paper's random zeroing trials)
    trials: int = 1000
    monotone: bool = True
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "MSBDSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MSBD settings {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_env(cls) -> "MSBDSettings":
        path = os.environ.get(CONFIG_ENV)
        return cls.from_dict(load_yaml(path)) if path else cls()

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def proposer(self) -> tuple[str, dict]:
        """Proposal method and its options (an edge model switches to EdgeBoxes, the paper's detector)."""
        if self.edge_model:
            return "edge_boxes", {"edge_model": self.edge_model, "max_boxes": max(200, 4 * self.patches)}
        if self.proposals == "selective_search":
            return self.proposals, {"mode": self.selective_search_mode}
        return self.proposals, {}
