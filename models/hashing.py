"""Deep hashing head and HashNet's continuation schedule for its sharpness ``beta``.

``HashHead(in_dim, bits)``: ``Linear(in_dim, bits)``, then
- training: ``tanh(beta * x)``, relaxed codes in (-1, 1)^bits that the hashing losses train;
- eval: sign codes as floats in {-1, +1}, with sign(0) = +1 so every bit is defined.
``codes(x)`` gives the same bits as booleans (True = +1) for ``retrieval.search.binary.pack_bits``.

HashNet (Cao et al., "HashNet: Deep Learning to Hash by Continuation", ICCV 2017) trains through
tanh(beta * x) and raises beta during training so the relaxation tends to sign(x); its code
(thuml/HashNet, pytorch/src/network.py) sets ``scale = init_scale * (1 + gamma * iter) ** power`` every
``step_size`` iterations with init_scale = 1, gamma = 0.005, power = 0.5, step_size = 200.
:class:`BetaSchedule` is that rule as a pure function of the step, so a resumed run gets the same beta
without saving it; ``beta`` is therefore a plain attribute of the head, not a parameter or a buffer.
HashNet's gamma is made for its tens of thousands of iterations: over a 200-step run it leaves beta at 1, and
the flowers configs' gamma 0.05 at 3.1, where tanh is still far from the sign the codes are evaluated with.
:meth:`BetaSchedule.reaching` keeps HashNet's power law and picks gamma so that beta reaches a given final
value (HashNet's own runs end near 10) by the run's last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from msretrieval.utils.errors import UserError

from .pca import pca_basis


def sign_codes(x: torch.Tensor) -> torch.Tensor:
    """{-1, +1} codes of ``x`` in its dtype, with sign(0) = +1 (``torch.sign`` would give 0 there)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def codes_of_output(output: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes u in [-1, 1] of a hashing network's output u / sqrt(bits) (``models.retrieval_net.Head``).

    Scaling back by sqrt(bits) is not exact in float32: a saturated tanh (u = +-1) comes back as +-1.0000001 at
    24 and 96 bits (``1 * 24 ** -0.5 * 24 ** 0.5``), outside the cube CSQ checks, which stopped runs mid-way
    once beta was high enough to saturate a bit. The clamp only moves such round-off (|u| <= 1 before the
    scaling); its gradient is tanh's, zero where the bit is saturated."""
    return (output * bits ** 0.5).clamp(-1.0, 1.0)


class HashHead(nn.Module):
    """``Linear(in_dim, bits)`` -> tanh(beta * x) in training, {-1, +1} sign codes in eval mode.

    ``bits`` must be a multiple of 8: codes are stored packed, 8 bits per byte. ``beta`` (> 0) is set from
    outside, normally by :meth:`BetaSchedule.apply` at every step."""

    def __init__(self, in_dim: int, bits: int, beta: float = 1.0):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        if bits < 1:
            raise UserError(f"bits must be >= 1, got {bits}")
        if bits % 8:
            raise UserError(f"bits must be a multiple of 8 (codes are packed into bytes), got {bits}")
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
    def init_itq(self, descriptors: torch.Tensor, iterations: int = 50, seed: int = 0) -> None:
        """Start from ITQ (Gong & Lazebnik, CVPR 2011) on ``descriptors`` (N, in_dim): PCA to ``bits``, then the
        rotation that minimises the quantisation loss, so the initial codes are ITQ's codes; scaled so the
        pre-tanh values have unit mean variance. Training then starts at the unsupervised baseline."""
        k = self.bits
        if len(descriptors) < 2 * k:
            raise UserError(f"ITQ to {k} bits needs at least {2 * k} training descriptors, got {len(descriptors)}: "
                             "raise model.init_images or lower model.head.hash_bits")
        x = descriptors.double().cpu()
        if x.shape[1] < k:
            raise UserError(f"ITQ to {k} bits of {x.shape[1]}-d descriptors: lower model.head.hash_bits")
        mean = x.mean(0)
        basis = pca_basis(x - mean, k, exact=True)
        projected = (x - mean) @ basis
        rotation, _ = itq_rotation(projected, iterations, torch.Generator().manual_seed(seed))
        weight = rotation.T @ basis.T
        weight = weight / (projected @ rotation).std(0).mean()
        self.linear.weight.copy_(weight.float())
        self.linear.bias.copy_((-weight @ mean).float())

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bits) booleans, True where the code bit is +1 (the eval-mode codes, in any mode)."""
        return self.linear(x) >= 0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, beta={self.beta:.4g}"


def procrustes(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin_W ||x W - target||_F with W^T W = I: W = U V^T from the SVD of x^T target."""
    u, _, vh = torch.linalg.svd(x.T @ target, full_matrices=False)
    return u @ vh


def itq_loss(v: torch.Tensor, rotation: torch.Tensor) -> float:
    projected = v @ rotation
    return float(((torch.sign(projected) + (projected == 0).float()) - projected).pow(2).sum())


def itq_rotation(v: torch.Tensor, iterations: int = 50, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, list[float]]:
    """ITQ on PCA-projected rows ``v`` (N, L): an L x L rotation and the loss ||B - V R||^2 per iteration."""
    dims = v.shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=v.dtype))
    history = []
    for _ in range(iterations):
        codes = torch.where(v @ rotation >= 0, 1.0, -1.0).to(v.dtype)
        # min ||B - V R||: R = U V^T from the SVD of V^T B
        rotation = procrustes(v, codes)
        history.append(itq_loss(v, rotation))
    return rotation, history


@dataclass
class SignCodes:
    """A learned linear binary code: bit = 1 where ``(x - mean) @ projection > 0`` (ITQ's {-1, 1} codes stored
    as {0, 1}; Hamming distances are the same in either convention)."""

    mean: np.ndarray                 # (D,)
    projection: np.ndarray           # (D, L), orthonormal columns
    objective: list[float] = field(default_factory=list)  # the learning's loss per iteration

    @property
    def bits(self) -> int:
        return self.projection.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float descriptors -> (N, L) bool codes."""
        return self.project(x).numpy() > 0

    def project(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(x, dtype=np.float64) - self.mean) @ self.projection).astype(np.float32))


def centre_rows(x: np.ndarray, bits: int) -> tuple[np.ndarray, torch.Tensor]:
    """(mean, centred float32 rows) of descriptors ``x`` (N, D) that ``bits`` bits are learned from."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be 2-D, got shape {x.shape}")
    if not 0 < bits <= min(x.shape):
        raise UserError(f"{bits} bits need at least {bits} training descriptors and dimensions, got {x.shape}")
    mean = x.mean(0)
    return mean, torch.from_numpy((x - mean).astype(np.float32))  # float32: twice as fast, precise enough


def learn_itq(x: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> SignCodes:
    """Classical ITQ (Gong & Lazebnik, CVPR 2011) of descriptors ``x`` (N, D): PCA to ``bits`` dims and the
    learned rotation, from a random rotation drawn with ``seed``; bit = 1 where the projection is positive."""
    mean, xc = centre_rows(x, bits)
    basis = pca_basis(xc, bits)
    rotation, history = itq_rotation(xc @ basis, iterations, torch.Generator().manual_seed(seed))
    return SignCodes(mean, (basis @ rotation).numpy(), objective=history)


def learn_pca_signs(x: np.ndarray, bits: int) -> SignCodes:
    """PCA hashing: the signs of the top ``bits`` principal components of descriptors ``x`` (N, D), ITQ
    without its rotation (the baseline that shows what the rotation adds)."""
    mean, xc = centre_rows(x, bits)
    return SignCodes(mean, pca_basis(xc, bits).numpy())



#: HashNet's gamma, used when ``model.hash_beta`` sets neither gamma nor final.
HASHNET_GAMMA = 0.005


@dataclass(frozen=True)
class BetaSchedule:
    """HashNet's continuation: beta(step) = beta0 * (1 + gamma * s) ** power, s = step rounded down to a
    multiple of ``step_size`` (HashNet updates its scale every 200 iterations; ``step_size=1`` gives the
    smooth curve). Defaults are HashNet's. ``step`` counts optimiser steps taken, from 0."""

    beta0: float = 1.0
    gamma: float = HASHNET_GAMMA
    power: float = 0.5
    step_size: int = 200

    def __post_init__(self):
        if not (math.isfinite(self.beta0) and self.beta0 > 0):
            raise UserError(f"beta0 must be finite and > 0, got {self.beta0}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise UserError(f"gamma must be finite and >= 0, got {self.gamma}")
        if not (math.isfinite(self.power) and self.power >= 0):
            raise UserError(f"power must be finite and >= 0, got {self.power}")
        if self.step_size < 1:
            raise UserError(f"step_size must be >= 1, got {self.step_size}")

    @classmethod
    def reaching(cls, final: float, last_step: int, beta0: float = 1.0, power: float = 0.5,
                 step_size: int = 200) -> BetaSchedule:
        """The schedule whose beta is ``final`` from the last update at or before ``last_step`` (a run's last
        step, ``train.steps - 1``) on: gamma = ((final / beta0) ** (1 / power) - 1) / L, L = ``last_step``
        rounded down to a multiple of ``step_size``, so beta0 * (1 + gamma * L) ** power = final."""
        constant = cls(beta0, 0.0, power, step_size)  # checks beta0, power and step_size
        if not (math.isfinite(final) and final >= beta0):
            raise UserError(f"the final beta must be finite and >= beta0 ({beta0}), got {final}")
        if final == beta0:
            return constant
        last_update = last_step - last_step % step_size
        if last_update <= 0 or power <= 0:
            raise UserError(f"beta cannot rise from {beta0} to {final}: " + (
                f"the step_size ({step_size}) leaves no update before the last step ({last_step})"
                if last_update <= 0 else "power is 0"))
        return cls(beta0, ((final / beta0) ** (1 / power) - 1) / last_update, power, step_size)

    @classmethod
    def from_config(cls, config: dict, steps: int) -> BetaSchedule:
        """``model.hash_beta`` for a run of ``steps`` steps: {beta0, gamma, power, step_size, final}, gamma null
        meaning HashNet's 0.005; ``final`` (with gamma null) is :meth:`reaching` at step ``steps - 1``."""
        final, gamma = config.get("final"), config.get("gamma")
        beta0, power, step_size = config["beta0"], config["power"], config["step_size"]
        if final is None:
            return cls(beta0, HASHNET_GAMMA if gamma is None else gamma, power, step_size)
        if gamma is not None:
            raise UserError(f"gamma ({gamma}) and final ({final}) are both set: final sets gamma (leave it null)")
        return cls.reaching(final, steps - 1, beta0, power, step_size)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        last_update = step - step % self.step_size
        return self.beta0 * (1.0 + self.gamma * last_update) ** self.power

    def apply(self, head: HashHead, step: int) -> float:
        """Set ``head.beta`` for ``step`` and return it."""
        head.beta = self(step)
        return head.beta
