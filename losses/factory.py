"""Losses and reducers by name, for configs and command lines."""
from __future__ import annotations

from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer, BaseReducer, MeanReducer, SumReducer

from msretrieval.utils.errors import UserError

from .contrastive import CirtorchContrastiveLoss
from .hashing import CSQLoss, DPSHLoss, QuantizedLoss
from .triplet import SquaredEuclideanTripletLoss

#: metric losses (any embedding; on hash codes wrapped in QuantizedLoss) and hashing losses (relaxed codes)
METRIC_LOSSES = {"triplet": SquaredEuclideanTripletLoss, "contrastive": CirtorchContrastiveLoss}
HASHING_LOSSES = {"csq": CSQLoss, "dpsh": DPSHLoss}
LOSSES = {**METRIC_LOSSES, **HASHING_LOSSES}
LOSS_NAMES = tuple(LOSSES)
# avg_nonzero: mean of the terms > 0 (PML's triplet default); mean: mean of all terms; sum: cirtorch.
REDUCERS = {"avg_nonzero": AvgNonZeroReducer, "mean": MeanReducer, "sum": SumReducer}
REDUCER_NAMES = tuple(REDUCERS)


def create_reducer(reducer: str | BaseReducer) -> BaseReducer:
    """A PML reducer from its name (a reducer instance is returned unchanged)."""
    if isinstance(reducer, BaseReducer):
        return reducer
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {REDUCER_NAMES} or pass a PML reducer")
    return REDUCERS[reducer]()


def _reject(name: str, **options) -> None:
    given = sorted(option for option, value in options.items() if value is not None)
    if given:
        raise UserError(f"the {name} loss takes no {', '.join(given)}")


def create_loss(name: str, margin: float | None = None, reducer: str | BaseReducer | None = None, *,
                quantization_weight: float | None = None, balance_weight: float | None = None,
                bits: int | None = None, num_classes: int | None = None) -> BaseMetricLossFunction:
    """A loss by name; None keeps a loss's defaults, and an option the loss does not take is an error.

    - ``triplet`` (squared L2, margin 0.1) or ``contrastive`` (cirtorch, margin 0.7); with
      ``quantization_weight`` and/or ``balance_weight`` (the other one then 0) wrapped in
      :class:`~losses.hashing.QuantizedLoss` to train hash codes.
    - ``csq``: :class:`~losses.hashing.CSQLoss`, needs ``bits`` and ``num_classes``; ``quantization_weight``
      defaults to 1e-4.
    - ``dpsh``: :class:`~losses.hashing.DPSHLoss`; ``quantization_weight`` is its eta (default 0.1).
    """
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")
    kwargs = {}
    if reducer is not None:
        kwargs["reducer"] = create_reducer(reducer)
    if name in METRIC_LOSSES:
        _reject(name, bits=bits, num_classes=num_classes)
        if margin is not None:
            kwargs["margin"] = margin
        loss = METRIC_LOSSES[name](**kwargs)
        if quantization_weight is None and balance_weight is None:
            return loss
        return QuantizedLoss(loss, quantization_weight or 0.0, balance_weight or 0.0)
    _reject(name, margin=margin, balance_weight=balance_weight)
    if name == "csq":
        if bits is None or num_classes is None:
            raise ValueError("the csq loss needs bits and num_classes")
        if quantization_weight is not None:
            kwargs["quantization_weight"] = quantization_weight
        return CSQLoss(bits, num_classes, **kwargs)
    _reject(name, bits=bits, num_classes=num_classes)
    if quantization_weight is not None:
        kwargs["eta"] = quantization_weight
    return DPSHLoss(**kwargs)
