"""Data: manifests, the revisitop layout, robust image loading, datasets and transforms."""
from .datasets import ImageDataset, crop_to_box
from .images import ImageLoadError, image_size, load_image
from .manifest import LabelledImageSet, ManifestError, flowers102, read_csv_manifest
from .revisitop import PROTOCOLS, RevisitopError, RevisitopSet, load_revisitop, save_revisitop
from .roots import resolve_data_root
from .transforms import EvalTransform, resized_shape

__all__ = [
    "EvalTransform", "ImageDataset", "ImageLoadError", "LabelledImageSet", "ManifestError", "PROTOCOLS",
    "RevisitopError", "RevisitopSet", "crop_to_box", "flowers102", "image_size", "load_image",
    "load_revisitop", "read_csv_manifest", "resized_shape", "resolve_data_root", "save_revisitop",
]
