"""MSBD - Multi-level Semantic Binary Descriptor (Chinese Journal of Computers 2020).

Three branches (global, object proposals + VLAD, saliency) of one feature extracting network give a float
descriptor; Algorithm 1 learns sparse binary codes from it; images are ranked by Hamming distance plus a
class-probability dissimilarity. Importing the package registers msbd_float, msbd, msbd_h, msbd_s and itq.
"""
from . import methods  # noqa: F401  (registers the methods)
