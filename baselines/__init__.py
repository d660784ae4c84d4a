"""Unsupervised baselines every trained model is compared with (registered as harness methods)."""
from . import scda  # noqa: F401  (registers scda, scda_plus, scda_flip_plus)
from . import msbd  # noqa: F401  (registers msbd_float, msbd, msbd_h, msbd_s, itq [@BITS])
