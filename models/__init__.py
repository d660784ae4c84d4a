"""Models: backbones with feature taps, pooling heads, the deep hashing head (the detector comes later)."""
from .backbones import FEATURES, Backbone, Preprocessing, WeightsError, create_backbone, offline_weights_path
from .hashing import BetaSchedule, HashHead, sign_codes
from .pooling import MAC, GeM, SPoC, create_pooling, gem, l2n, mac, spoc

__all__ = ["FEATURES", "Backbone", "BetaSchedule", "GeM", "HashHead", "MAC", "Preprocessing", "SPoC", "WeightsError",
           "create_backbone", "create_pooling", "gem", "l2n", "mac", "offline_weights_path", "sign_codes", "spoc"]
