"""torch.hub entry points.

    retriever = torch.hub.load("path/to/this/repo", "retriever", source="local", release="releases/flowers102")
    descriptors = retriever.encode(["a.jpg", "b.jpg"])   # (N, D) float32 numpy array

``release`` is a directory made by ``scripts/export.py`` (safetensors + JSON, checksum verified) or a training
checkpoint (``.pth``, read with ``weights_only=True``). Everything is imported as ``msretrieval.*``, so a
project's own ``utils``, ``models`` or ``data`` modules do not collide; no training code and no FAISS is loaded.
``dependencies`` below are the only packages loading needs (tests/release/test_release.py checks it).
"""
dependencies = ["torch", "torchvision", "timm", "safetensors", "numpy", "PIL", "tqdm"]


def retriever(release: str, device: str = "cpu"):
    """A ``release.Retriever`` (``encode(images | paths | tensors)``) for the release at ``release``."""
    from msretrieval.release import load_release

    return load_release(release, device=device)
