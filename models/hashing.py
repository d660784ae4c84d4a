"""Deep hashing head and HashNet's continuation schedule for its sharpness ``beta``.

``HashHead(in_dim, bits)``: ``Linear(in_dim, bits)``, then
- training: ``tanh(beta * x)``, relaxed codes in (-1, 1)^bits that the hashing losses train;
- eval: sign codes as floats in {-1, +1}, with sign(0) = +1 so every bit is defined.
``codes(x)`` gives the same bits as booleans (True = +1) for ``retrieval.binary.pack_bits``.

HashNet (Cao et al., "HashNet: Deep Learning to Hash by Continuation", ICCV 2017) trains through
tanh(beta * x) and raises beta during training so the relaxation tends to sign(x); its code
(thuml/HashNet, pytorch/src/network.py) sets ``scale = init_scale * (1 + gamma * iter) ** power`` every
``step_size`` iterations with init_scale = 1, gamma = 0.005, power = 0.5, step_size = 200.
:class:`BetaSchedule` is that rule as a pure function of the step, so a resumed run gets the same beta
without saving it; ``beta`` is therefore a plain attribute of the head, not a parameter or a buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def sign_codes(x: torch.Tensor) -> torch.Tensor:
    """{-1, +1} codes of ``x`` in its dtype, with sign(0) = +1 (``torch.sign`` would give 0 there)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class HashHead(nn.Module):
    """``Linear(in_dim, bits)`` -> tanh(beta * x) in training, {-1, +1} sign codes in eval mode.

    ``bits`` must be a multiple of 8: codes are stored packed, 8 bits per byte. ``beta`` (> 0) is set from
    outside, normally by :meth:`BetaSchedule.apply` at every step."""

    def __init__(self, in_dim: int, bits: int, beta: float = 1.0):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8 (codes are packed into bytes), got {bits}")
        self.linear = nn.Linear(in_dim, bits)
        self.bits = bits
        self.beta = beta

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"beta must be finite and > 0, got {value}")
        self._beta = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 under autocast (as the other heads): in float16 tanh saturates to exactly +-1 early, and
        # the losses take logs of (1 +- u).
        logits = self.linear(x).float()
        return torch.tanh(self.beta * logits) if self.training else sign_codes(logits)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bits) booleans, True where the code bit is +1 (the eval-mode codes, in any mode)."""
        return self.linear(x) >= 0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, beta={self.beta:.4g}"


@dataclass(frozen=True)
class BetaSchedule:
    """HashNet's continuation: beta(step) = beta0 * (1 + gamma * s) ** power, s = step rounded down to a
    multiple of ``step_size`` (HashNet updates its scale every 200 iterations; ``step_size=1`` gives the
    smooth curve). Defaults are HashNet's. ``step`` counts optimiser steps taken, from 0."""

    beta0: float = 1.0
    gamma: float = 0.005
    power: float = 0.5
    step_size: int = 200

    def __post_init__(self):
        if not (math.isfinite(self.beta0) and self.beta0 > 0):
            raise ValueError(f"beta0 must be finite and > 0, got {self.beta0}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {self.gamma}")
        if not (math.isfinite(self.power) and self.power >= 0):
            raise ValueError(f"power must be finite and >= 0, got {self.power}")
        if self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        last_update = step - step % self.step_size
        return self.beta0 * (1.0 + self.gamma * last_update) ** self.power

    def apply(self, head: HashHead, step: int) -> float:
        """Set ``head.beta`` for ``step`` and return it."""
        head.beta = self(step)
        return head.beta
