"""Released models for downstream retrieval code: export a training run, load it back, encode images.

A release directory holds ``model.safetensors`` (the weights: tensors only, no pickle), ``config.json`` (how
to rebuild and feed the network, what it was trained on, how it scored, the weights' SHA-256), ``README.md``
(a model card) and ``model.pt2`` (a ``torch.export`` graph that computes the same descriptors with torch
alone). Loading needs torch, torchvision, timm, safetensors, numpy, pillow and tqdm (``hubconf.py``'s
``dependencies``), never the training code or FAISS::

    from msretrieval.release import load_release
    retriever = load_release("releases/flowers102")
    descriptors = retriever.encode(["a.jpg", "b.jpg"])     # (2, D) float32, L2-normalised
"""
from .format import ReleaseError
from .load import load_release
from .retriever import Retriever

__all__ = ["ReleaseError", "Retriever", "load_release"]
