"""Global pooling of a conv feature map (B, C, H, W) -> (B, C).

GeM (generalised mean, Radenovic et al.) with a learnable exponent p; p = 1 is SPoC (average pooling) and
p -> infinity is MAC (max pooling). An optional ``mask`` (B, 1, H, W) restricts pooling to selected
positions (used by SCDA and regional pooling); a sample whose mask is empty falls back to all positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fallback_mask(mask: torch.Tensor) -> torch.Tensor:
    empty = mask.flatten(1).sum(1) == 0
    if empty.any():
        mask = mask.clone()
        mask[empty] = 1
    return mask


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6, mask: torch.Tensor | None = None
        ) -> torch.Tensor:
    x = x.clamp(min=eps).pow(p)
    if mask is None:
        pooled = x.mean(dim=(-2, -1))
    else:
        mask = _fallback_mask(mask.to(x.dtype))
        pooled = (x * mask).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1))
    return pooled.pow(1.0 / p)


def spoc(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=(-2, -1))
    mask = _fallback_mask(mask.to(x.dtype))
    return (x * mask).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1))


def mac(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return x.amax(dim=(-2, -1))
    mask = _fallback_mask(mask)
    return x.masked_fill(mask == 0, float("-inf")).amax(dim=(-2, -1))


class GeM(nn.Module):
    """Generalised-mean pooling; ``learn_p`` makes the exponent a trained parameter (cirtorch's default)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return gem(x, self.p, self.eps, mask)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, eps={self.eps}, learn_p={self.p.requires_grad}"


class SPoC(nn.Module):
    """Sum/average pooling (Babenko & Lempitsky)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return spoc(x, mask)


class MAC(nn.Module):
    """Maximum activation of convolutions (Tolias et al.)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return mac(x, mask)


POOLINGS = {"gem": GeM, "spoc": SPoC, "gap": SPoC, "mac": MAC}


def create_pooling(name: str, **kwargs) -> nn.Module:
    try:
        return POOLINGS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)}") from None


def l2n(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1, eps=eps)
