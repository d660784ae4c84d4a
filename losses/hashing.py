"""Deep hashing losses on relaxed codes u in [-1, 1]^K (``models.hashing.HashHead`` in training mode).

- :class:`QuantizedLoss` ``(base_loss, quantization_weight, balance_weight)``: any metric loss on the codes
  (e.g. the triplet or contrastive loss of this package) plus the two terms below.
- :class:`CSQLoss` ``(bits, num_classes, quantization_weight=1e-4)``: Central Similarity Quantization.
- :class:`DPSHLoss` ``(eta=0.1)``: DPSH's pairwise likelihood.
- :class:`SimilarityDistillation` ``(weight)``: a term added to any of them, ``distill(codes, descriptors)``: the
  codes' inner products follow the cosine similarities of the network's own float descriptors.

Every one is a PML loss, called PML-style: ``loss(codes, labels, indices_tuple=None)``. ``compute_loss``
returns each term under its own key of PML's loss dict, already multiplied by its weight, and PML's
reducers reduce the terms one by one and add them up. ``last_terms`` holds the unweighted terms of the last
call as plain means over the batch (whatever the reducer), for logging.

Terms shared by the losses (N codes of K bits):
- quantization error ``mean_n mean_k (|u_nk| - 1)^2``. Since (|u| - 1)^2 = (u - sign u)^2, this is the
  ||u - sign(u)||^2 / K of DPSH and DTSH (Wang et al., ACCV 2016) and the Q_loss of CSQ's code.
- bit balance ``mean_k (mean_n u_nk)^2``: zero when every bit is +1 for half of the batch, so no bit is wasted
  on a near-constant (hashing's balanced-bits criterion, sum_n b_n = 0 in Spectral Hashing, Weiss et al.,
  NIPS 2008, as a penalty on the batch's relaxed codes).
- similarity distillation ``mean_{i != j} (u_i . u_j / K - s_ij)^2``, s_ij the cosine similarity of the float
  descriptors that the hashing layer codes (:func:`similarity_distillation`).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import BaseReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CSQ_QUANTIZATION_WEIGHT = 1e-4
DEFAULT_DPSH_ETA = 0.1
# Probabilities of CSQ's cross-entropy are kept >= this (torch's BCE backward uses the same epsilon), so a
# bit saturated at the wrong sign gives a finite loss and gradient.
_MIN_PROBABILITY = 1e-12
# Draws of random hash centres tried before giving up on distinct centres.
_CENTRE_DRAWS = 100


def quantization_errors(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) relaxed codes -> (N,) mean over bits of (|u| - 1)^2."""
    return (codes.abs() - 1).pow(2).mean(dim=1)


def bit_balance(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) relaxed codes -> mean over bits of (mean over the batch of u)^2, a scalar."""
    return codes.mean(dim=0).pow(2).mean()


def similarity_distillation(codes: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """(N, K) relaxed codes u, (N, D) float descriptors -> mean over the pairs i != j of
    (u_i . u_j / K - cos(d_i, d_j))^2, a scalar (0 for fewer than two codes).

    The descriptors are the teacher: their similarities are targets, detached, so the term trains the codes
    (and, through the hashing layer, the network) towards the float model's similarities without moving the
    float model to meet the codes. u . u / K and the cosines both lie in [-1, 1]; for sign codes
    u_i . u_j / K = 1 - 2 Hamming / K, so the term asks Hamming distances to keep the float model's similarities
    (its ranking within a class and across classes), which the labels alone do not constrain."""
    count, bits = codes.shape
    if count < 2:
        return codes.new_zeros(())
    unit = F.normalize(descriptors.detach().to(codes.dtype), dim=1)
    error = codes @ codes.T / bits - unit @ unit.T
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=codes.device)
    return error[off_diagonal].pow(2).mean()


def _check_weight(name: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _per_sample(losses: torch.Tensor, embeddings: torch.Tensor) -> dict:
    return {"losses": losses, "indices": c_f.torch_arange_from_size(embeddings), "reduction_type": "element"}


def _already_reduced(loss: torch.Tensor) -> dict:
    return {"losses": loss, "indices": None, "reduction_type": "already_reduced"}


class RecordsTerms:
    """Keeps the unweighted terms of the last call for logging (``last_terms``)."""

    _last_terms: dict[str, torch.Tensor] = {}  # replaced, never changed in place, by _record

    def _record(self, **terms: torch.Tensor) -> None:
        self._last_terms = {name: value.detach() for name, value in terms.items()}

    @property
    def last_terms(self) -> dict[str, float]:
        """Unweighted terms of the last call (means over the batch), e.g. {"metric": ..., "quantization": ...}."""
        return {name: float(value) for name, value in self._last_terms.items()}


class HashingLoss(RecordsTerms, BaseMetricLossFunction):
    """PML loss keeping the unweighted terms of its last call for logging (``last_terms``)."""


class SimilarityDistillation(RecordsTerms):
    """``weight`` x :func:`similarity_distillation` of a batch's relaxed codes and the float descriptors the
    hashing layer coded (the network's own, from the same forward pass: self-distillation). Not a PML loss:
    its second input is the descriptors, not labels. ``last_terms``: {"distill": the unweighted term}."""

    def __init__(self, weight: float):
        self.weight = _check_weight("distill_weight", weight)

    def __call__(self, codes: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        term = similarity_distillation(codes, descriptors)
        self._record(distill=term)
        return self.weight * term


class QuantizedLoss(HashingLoss):
    """``base_loss(u) + quantization_weight * quantization error + balance_weight * bit balance``.

    ``base_loss`` sees the codes, labels, ``indices_tuple`` and reference codes unchanged and reduces its own
    terms with its own reducer; the two regularisers are means (see module doc). ``distance`` and ``margin``
    are the base loss's, so miners built for the base loss (``miners.create_miner``) take the wrapper too.

    On codes the base loss's margin is in its own distance: with the squared Euclidean distance of the
    triplet loss, two sign codes at Hamming distance h are 4h apart, so the triplet margin is 4 x the bits
    of separation wanted (the default 0.1, made for unit descriptors, is far too small for codes).
    Loss dict keys: ``metric_loss``, ``quantization_loss``, ``balance_loss``.
    """

    def __init__(self, base_loss: BaseMetricLossFunction, quantization_weight: float, balance_weight: float,
                 code_scale: float = 1.0):
        quantization_weight = _check_weight("quantization_weight", quantization_weight)
        balance_weight = _check_weight("balance_weight", balance_weight)
        if not (math.isfinite(code_scale) and code_scale > 0):
            raise ValueError(f"code_scale must be finite and > 0, got {code_scale}")
        super().__init__(distance=base_loss.distance)
        self.base_loss = base_loss
        self.quantization_weight = quantization_weight
        self.balance_weight = balance_weight
        # the embeddings are codes / code_scale (a RetrievalNet's hash output is u / sqrt(bits), unit length
        # once binary, so the base loss's margin keeps its meaning); the regularisers act on u itself
        self.code_scale = float(code_scale)

    def _sub_loss_names(self) -> list[str]:
        return ["metric_loss", "quantization_loss", "balance_loss"]

    @property
    def margin(self) -> float:
        return self.base_loss.margin

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # PML has already set ref_emb = embeddings when none was given; pass None then, so the base loss
        # sees exactly the call it would have seen unwrapped.
        own_reference = ref_emb is embeddings
        metric = self.base_loss(embeddings, labels, indices_tuple,
                                None if own_reference else ref_emb, None if own_reference else ref_labels)
        codes = embeddings * self.code_scale
        errors = quantization_errors(codes)
        balance = bit_balance(codes)
        self._record(metric=metric, quantization=errors.mean(), balance=balance)
        return {"metric_loss": _already_reduced(metric),
                "quantization_loss": _per_sample(self.quantization_weight * errors, embeddings),
                "balance_loss": _already_reduced(self.balance_weight * balance)}


def hadamard_matrix(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix (``order`` a power of two), in ``scipy.linalg.hadamard``'s row order."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's Hadamard matrix needs a power-of-two order, got {order}")
    matrix = torch.ones(1, 1)
    while len(matrix) < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hash_centres(bits: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """(num_classes, bits) centres in {-1, +1}: CSQ's Algorithm 1, with the centres in antipodal pairs.

    The centres are c_0, -c_0, c_1, -c_1, ... (the last one unpaired when ``num_classes`` is odd), so every
    bit is +1 in exactly half of the centres (one more or less for an odd count) and no bit is the same in
    every centre. CSQ's code takes the first rows of H_K (``ha_d[0:num_class]`` when num_class <= K): every
    row of Sylvester's H_K starts with +1, so bit 0 is +1 in every centre and carries no class information
    (with 10 classes, 4 of 64 bits are constant). Pairs keep CSQ's distances: two centres are bits / 2 apart
    in Hamming distance, a centre and its negation bits apart.

    When ``bits`` is a power of two and 2 * bits >= num_classes, c_i is row i of H_K. Otherwise every bit of
    c_i is drawn from Bernoulli(0.5) with a generator seeded by ``seed``, so the centres are the same in every
    run and process; their distances are only bits / 2 on average. A draw with two equal centres is redrawn
    (the authors' notebook likewise redraws until its centres are far enough apart)."""
    if bits < 1 or num_classes < 1:
        raise ValueError(f"bits and num_classes must be >= 1, got {bits} and {num_classes}")
    halves = (num_classes + 1) // 2  # the c_i; their negations complete the pairs
    power_of_two = not bits & (bits - 1)
    if power_of_two and 2 * bits >= num_classes:
        return antipodal_pairs(hadamard_matrix(bits)[:halves], num_classes)
    reason = "is not a power of two" if not power_of_two else f"gives only {2 * bits} Hadamard centres"
    log.warning("CSQ: %d bits %s; drawing %d hash centres from Bernoulli(0.5) (seed %d), which are only "
                "bits / 2 apart on average", bits, reason, num_classes, seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(_CENTRE_DRAWS):
        drawn = torch.randint(0, 2, (halves, bits), generator=generator).float() * 2 - 1
        centres = antipodal_pairs(drawn, num_classes)
        if len(torch.unique(centres, dim=0)) == num_classes:
            return centres
    raise UserError(f"{_CENTRE_DRAWS} draws of {num_classes} random {bits}-bit hash centres (seed {seed}) all had "
                     "two centres that coincide: use more bits")


def antipodal_pairs(codes: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` of codes[0], -codes[0], codes[1], -codes[1], ..."""
    return torch.stack([codes, -codes], dim=1).flatten(0, 1)[:count]


class CSQLoss(HashingLoss):
    """Central Similarity Quantization (Yuan et al., CVPR 2020), single-label.

    Each class y has a hash centre c_y in {-1, +1}^K (:func:`hash_centres`). Labels must be class indices in
    [0, num_classes) (map other class ids to indices first); any other label is an error, never wrapped
    onto a centre. Per code u:
        central loss  = mean_k BCE((u_k + 1) / 2, (c_yk + 1) / 2) = mean_k -log((1 + c_yk u_k) / 2)
        quantization  = mean_k (|u_k| - 1)^2
    loss = mean over the batch of central + quantization_weight * quantization (reducer: mean by default).
    The paper's quantization loss is sum_k log cosh(|u_k| - 1); the authors' code (yuanli2333/
    Hadamard-Matrix-for-hashing, train.py: ``torch.mean((torch.abs(y) - 1.0) ** 2)`` next to
    ``nn.BCELoss`` on ``0.5 * (y + 1)``) uses the squared form, which is what this uses (log cosh x ~ x^2 / 2
    near 0). Weight 1e-4 is DeepHash-pytorch's CSQ setting; the authors' README trains with 1e-3.
    BCE probabilities are floored at 1e-12 (a bit saturated at the wrong sign costs ~27.6, not infinity).

    The codes must lie in [-1, 1] (tanh outputs). No ``indices_tuple`` (the loss is per sample) and no
    ``ref_emb``. Loss dict keys: ``central_loss``, ``quantization_loss``.
    """

    def __init__(self, bits: int, num_classes: int, quantization_weight: float = DEFAULT_CSQ_QUANTIZATION_WEIGHT,
                 seed: int = 0, reducer: BaseReducer | None = None):
        quantization_weight = _check_weight("quantization_weight", quantization_weight)
        centres = hash_centres(bits, num_classes, seed)
        super().__init__(reducer=reducer)
        self.bits = bits
        self.num_classes = num_classes
        self.quantization_weight = quantization_weight
        # Not saved with a state dict: the centres are a function of (bits, num_classes, seed).
        self.register_buffer("centres", centres, persistent=False)

    def _sub_loss_names(self) -> list[str]:
        return ["central_loss", "quantization_loss"]

    def check_inputs(self, codes: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is None:
            raise ValueError("CSQ needs class labels")
        if codes.ndim != 2 or codes.shape[1] != self.bits:
            raise ValueError(f"CSQ was built for {self.bits}-bit codes, got shape {tuple(codes.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise ValueError(f"CSQ labels must be integer class indices, got dtype {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"CSQ labels must lie in [0, {self.num_classes}) (num_classes={self.num_classes}), "
                             f"got values from {int(labels.min())} to {int(labels.max())}")
        if len(codes) and codes.detach().abs().max() > 1:
            raise ValueError("CSQ needs relaxed codes in [-1, 1] (tanh outputs, e.g. HashHead in training mode)")

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is not None:
            raise ValueError("CSQ is a per-sample loss on class labels: it takes no indices_tuple")
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self.check_inputs(embeddings, labels)
        centres = self.centres.to(embeddings)[labels]
        # The BCE target (c + 1) / 2 is 0 or 1, so per bit BCE = -log of the probability given to the
        # centre's sign, (1 + c * u) / 2.
        probability = ((1 + centres * embeddings) / 2).clamp(min=_MIN_PROBABILITY)
        central = -torch.log(probability).mean(dim=1)
        errors = quantization_errors(embeddings)
        self._record(central=central.mean(), quantization=errors.mean())
        return {"central_loss": _per_sample(central, embeddings),
                "quantization_loss": _per_sample(self.quantization_weight * errors, embeddings)}


class DPSHLoss(HashingLoss):
    """DPSH (Li, Wang and Kang, IJCAI 2016, "Feature Learning based Deep Supervised Hashing with Pairwise
    Labels"): the negative log-likelihood of the pairwise labels plus a quantization term.

    For a pair (i, j): theta_ij = <u_i, u_j> / 2, p(s_ij = 1) = sigmoid(theta_ij), s_ij = 1 when the labels
    are equal, and the pair's loss is -log p(s_ij | theta_ij) = log(1 + e^theta_ij) - s_ij theta_ij
    (``softplus``, stable for any theta). Per code: ||u_i - sign(u_i)||^2 / K (sign(0) = +1).
    loss = mean over pairs + eta * mean over codes of that (reducer: mean by default).

    Pairs: every ordered pair i != j of the batch (each unordered pair twice, which leaves the mean
    unchanged), or the pairs of ``indices_tuple`` (pairs, or triplets split into a positive and a negative
    pair); with ``ref_emb`` (e.g. a memory of the training set's codes), every (batch, reference) pair. The pair terms are PML "element" losses indexed by their anchor, so PML's
    reducers take the mean, sum or mean of non-zero terms over all pairs together (not positives and
    negatives separately). Loss dict keys: ``likelihood_loss``, ``quantization_loss``.
    """

    def __init__(self, eta: float = DEFAULT_DPSH_ETA, reducer: BaseReducer | None = None):
        eta = _check_weight("eta", eta)
        super().__init__(reducer=reducer)
        self.eta = eta

    def _sub_loss_names(self) -> list[str]:
        return ["likelihood_loss", "quantization_loss"]

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        positive_anchors, positives, negative_anchors, negatives = lmu.convert_to_pairs(indices_tuple, labels,
                                                                                         ref_labels)
        anchors = torch.cat([positive_anchors, negative_anchors])
        others = torch.cat([positives, negatives])
        similar = torch.cat([torch.ones_like(positives), torch.zeros_like(negatives)]).to(embeddings.dtype)
        theta = 0.5 * (embeddings[anchors] * ref_emb[others]).sum(dim=1)
        pair_losses = F.softplus(theta) - similar * theta
        errors = quantization_errors(embeddings)  # = ||u - sign(u)||^2 / K
        if len(anchors) == 0:  # e.g. a single code: only the quantization term
            self._record(likelihood=pair_losses.new_zeros(()), quantization=errors.mean())
            likelihood = self.zero_loss()
        else:
            self._record(likelihood=pair_losses.mean(), quantization=errors.mean())
            likelihood = {"losses": pair_losses, "indices": anchors, "reduction_type": "element"}
        return {"likelihood_loss": likelihood, "quantization_loss": _per_sample(self.eta * errors, embeddings)}
