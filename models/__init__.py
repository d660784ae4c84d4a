"""Models: backbones with feature taps, pooling heads (NetVLAD, hashing and the detector come later)."""
from .backbones import FEATURES, Backbone, Preprocessing, WeightsError, create_backbone, offline_weights_path
from .pooling import MAC, GeM, SPoC, create_pooling, gem, l2n, mac, spoc

__all__ = ["FEATURES", "Backbone", "GeM", "MAC", "Preprocessing", "SPoC", "WeightsError", "create_backbone",
           "create_pooling", "gem", "l2n", "mac", "offline_weights_path", "spoc"]
