"""Which parameters train, in which mode, with which optimiser and learning-rate schedule."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from msretrieval.utils.errors import UserError


def freeze(model: nn.Module, trainable_prefixes: list[str]) -> list[nn.Parameter]:
    """Train only parameters under the given module names (``all``: everything). A name that matches no
    parameter is an error: a typo would silently freeze that part."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [name for name, _ in model.named_parameters()]
    if "all" not in trainable_prefixes:
        for prefix in trainable_prefixes:
            if not any(under(name, prefix) for name in names):
                top = sorted({".".join(name.split(".")[:3]) for name in names})[:10]
                raise UserError(f"model.trainable: {prefix!r} matches no parameter (names look like {top})")
    trainable = []
    for name, parameter in model.named_parameters():
        keep = "all" in trainable_prefixes or any(under(name, p) for p in trainable_prefixes)
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(parameter)
    return trainable


def set_train_mode(model: nn.Module) -> None:
    """Train mode, but BatchNorm layers keep their ImageNet statistics: batches of a few classes would skew
    them, and frozen statistics make a sample's embedding independent of its batch (and of how a batch is
    split across processes)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside (embedding without gradient, e.g. a mining round); afterwards every module gets back the
    mode it had, so a training step that mines keeps its train mode (and its BatchNorm layers their frozen
    statistics, :func:`set_train_mode`)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def mining_mode(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`evaluation_mode` for a mining round's embedding, except that a hashing layer (``head.hash``)
    keeps its training output tanh(beta x). The miner must rank by the codes the loss then sees: eval mode's
    sign codes are other codes (their squared distances are multiples of 4 / K, so most ranks are ties), and a
    triplet mined on them can be easy, or wrongly ordered, for the relaxed codes trained (issue 25)."""
    with evaluation_mode(model):
        hash_layer = getattr(getattr(model, "head", None), "hash", None)
        if hash_layer is not None:
            hash_layer.train()
        yield model


def build_optimizer(model: nn.Module, optim: dict, steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two groups (backbone ``lr``, head ``head_lr``); linear warm-up, then cosine or constant.
    The schedule advances once per optimiser step (after gradient accumulation)."""
    head = model.head if hasattr(model, "head") else None
    head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    head_ids = {id(p) for p in head_params}
    trunk_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": trunk_params, "lr": optim["lr"]},
              {"params": head_params, "lr": optim["head_lr"] if optim.get("head_lr") is not None else optim["lr"]}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=optim["weight_decay"])
    warmup, kind = optim["warmup_steps"], optim["scheduler"]
    if kind not in ("cosine", "constant"):
        raise UserError(f"optim.scheduler must be 'cosine' or 'constant', got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
