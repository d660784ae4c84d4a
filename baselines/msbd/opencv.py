"""OpenCV, imported when an MSBD branch first needs it: the package is the ``baselines`` extra, so an install
without it still evaluates every other method (and registers MSBD's names)."""
from __future__ import annotations

from msretrieval.utils.errors import UserError


def opencv():
    """The ``cv2`` module, or a one-line :class:`UserError` saying which extra installs it."""
    try:
        import cv2
    except ImportError as error:
        raise UserError(f"the MSBD baseline needs OpenCV ({error}): pip install 'msretrieval[baselines]' "
                        "(opencv-contrib-python-headless)") from None
    return cv2
