"""Unsupervised baselines every trained model is compared with (registered as harness methods)."""
from . import scda  # noqa: F401  (registers scda, scda_plus, scda_flip_plus)
