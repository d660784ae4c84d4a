"""``Retriever``: a released network plus its own preprocessing; ``encode`` turns images into descriptors.

A hashing release has two more outputs (``encode(..., output=...)``): ``"projection"``, the hashing layer's
real-valued output whose signs are the code (:meth:`Retriever.encode_queries`: a query scored asymmetrically
against database codes), and ``"floats"``, the float descriptor the codes are made from (kept on disk by an
index for two-stage re-ranking). :meth:`Retriever.encode_outputs` gives several from one pass over the images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from msretrieval.data.images import image_size, load_image
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.retrieval_net import RetrievalNet
from msretrieval.retrieval.search.binary import pack_bits
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler
from msretrieval.utils.errors import UserError

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
#: "descriptor": what the index stores (floats, or packed codes of a hashing release); the others: hashing only
OUTPUTS = ("descriptor", "projection", "floats")


class Retriever:
    """Encode images with a released model, exactly as its evaluation did.

    Paths and PIL images get the release's resize (``input.resize`` side to ``input.image_size``, aspect ratio
    kept, no crop) and normalisation; tensors are taken as RGB in [0, 1], (3, H, W) or (N, 3, H, W), already at
    the size the caller wants, and are only normalised. Images of one size are batched together; the output
    keeps the input order.
    """

    def __init__(self, model: RetrievalNet, config: dict, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        spec = config["input"]
        self.mean, self.std = tuple(spec["mean"]), tuple(spec["std"])
        self.transform = EvalTransform(size=int(spec["image_size"]), mode=spec["resize"], mean=self.mean,
                                       std=self.std, interpolation=spec.get("interpolation", "bilinear"))

    @property
    def dim(self) -> int:
        """Descriptor width: floats, or bytes of packed codes for a hashing release."""
        return int(self.config["descriptor"]["dim"])

    @property
    def binary(self) -> bool:
        """A hashing release: ``encode`` returns packed codes (uint8, most significant bit first)."""
        return bool(self.config["descriptor"].get("binary"))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.binary else np.float32)

    def __repr__(self) -> str:
        model = self.config["model"]
        return (f"Retriever({model['architecture']} on {model['backbone']}, {self.dim}-d, "
                f"{self.config['input']['resize']} side {self.config['input']['image_size']} px, {self.device})")

    def _shape(self, output: str) -> tuple[int, np.dtype]:
        """(width, dtype) of an output."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output == "descriptor":
            return self.dim, self.dtype
        if not self.binary:
            raise UserError(f"the {output!r} output is a hashing release's; this release has float descriptors")
        if output == "projection":
            return int(self.config["descriptor"]["bits"]), np.dtype(np.float32)
        return self.model.head.hash.linear.in_features, np.dtype(np.float32)

    @torch.no_grad()
    def encode_tensor(self, images: torch.Tensor, outputs: Sequence[str] = ("descriptor",)) -> list[np.ndarray]:
        """A normalised (N, 3, H, W) batch -> one array per output: (N, D) float32 descriptors (packed uint8
        codes if binary), (N, bits) float32 projections, (N, D) float32 floats (see the module docstring)."""
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        if not self.binary:
            for output in outputs:  # one clear error for a hashing output
                self._shape(output)
            return [self.model(images).float().cpu().numpy()] * len(outputs)
        projection, floats = self.model.code_parts(images)
        parts = {"descriptor": pack_bits((projection >= 0).cpu().numpy()), "projection": projection.cpu().numpy(),
                 "floats": floats.cpu().numpy()}
        return [parts[output] for output in outputs]

    def encode(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16,
               progress: bool | None = None, output: str = "descriptor") -> np.ndarray:
        """(N, D) float32 L2-normalised descriptors of ``images`` (a path, PIL image or tensor, or a list of
        them, or an (N, 3, H, W) tensor); (N, bits / 8) uint8 packed codes for a hashing release (or its
        ``output``: see the module docstring). ``progress``: a progress bar (None: only on a terminal)."""
        return self.encode_outputs(images, (output,), batch_size, progress)[0]

    def encode_queries(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16,
                       progress: bool | None = None) -> np.ndarray:
        """Queries for asymmetric search: a hashing release's float projections (N, bits), whose inner product
        with a database code in {-1, +1} ranks finer than Hamming distance; a float release's descriptors."""
        return self.encode(images, batch_size, progress, output="projection" if self.binary else "descriptor")

    def encode_outputs(self, images: ImageInput | Sequence[ImageInput], outputs: Sequence[str],
                       batch_size: int = 16, progress: bool | None = None) -> list[np.ndarray]:
        """Several outputs of :meth:`encode` from one pass over the images, in the order asked."""
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        shapes = [self._shape(output) for output in outputs]
        items = self._as_list(images)
        results = [np.empty((len(items), width), dtype=dtype) for width, dtype in shapes]
        if not items:
            return results
        batches = SizeBucketBatchSampler([self._group_key(item, i) for i, item in enumerate(items)], batch_size)
        with tqdm(total=len(items), desc="encode", unit="img", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for chunk in batches:
                encoded = self.encode_tensor(torch.stack([self._prepare(items[i]) for i in chunk]), outputs)
                for result, rows in zip(results, encoded):
                    result[chunk] = rows
                bar.update(len(chunk))
        return results

    # -- inputs ------------------------------------------------------------------------------------------------
    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                return [images]
            if images.dim() == 4:
                return list(images)
            raise ValueError(f"an image tensor is (3, H, W) or (N, 3, H, W), got shape {tuple(images.shape)}")
        if isinstance(images, (str, os.PathLike, Image.Image)):
            return [images]
        if isinstance(images, Iterable):
            return list(images)
        raise TypeError(f"cannot encode {type(images).__name__}: give paths, PIL images or tensors")

    def _group_key(self, item, index: int) -> tuple:
        """Items that batch together: tensors and images of the same resized size."""
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"image tensor {index} must be (3, H, W), got {tuple(item.shape)}")
            return ("tensor", *item.shape[1:])
        if isinstance(item, Image.Image):
            return ("image", *self.transform.output_size(*item.size))
        if isinstance(item, (str, os.PathLike)):
            return ("image", *self.transform.output_size(*image_size(Path(item))))
        raise TypeError(f"item {index}: cannot encode {type(item).__name__}; give paths, PIL images or tensors")

    def _prepare(self, item) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return TF.normalize(item.float(), self.mean, self.std)
        image = item if isinstance(item, Image.Image) else load_image(item)
        return self.transform(image.convert("RGB") if image.mode != "RGB" else image)
