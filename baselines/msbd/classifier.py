"""The class-probability head p for MSBD's dissimilarity.

The paper fine-tunes a ResNet-50 classifier on the training classes and uses its softmax. Here a linear
softmax classifier (multinomial logistic regression) is fitted on frozen global-branch FEN descriptors of
the training split: full-batch Adam, a few hundred steps, a little weight decay. On a class-disjoint
benchmark (Flowers-102 test classes are not training classes) p describes an image by its similarity to
the training classes, which is all the dissimilarity needs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SoftmaxClassifier:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor    # (C,)
    classes: np.ndarray   # the training labels, in logit order

    @classmethod
    def fit(cls, x: torch.Tensor, labels, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4,
            seed: int = 0) -> "SoftmaxClassifier":
        labels = np.asarray(labels)
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} descriptors")
        classes, targets = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise UserError("the class-probability head needs at least two training classes")
        torch.manual_seed(seed)
        x = x.float()
        layer = torch.nn.Linear(x.shape[1], len(classes))
        optimiser = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
        target = torch.from_numpy(targets)
        with torch.enable_grad():
            for _ in range(steps):
                optimiser.zero_grad()
                loss = F.cross_entropy(layer(x), target)
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            accuracy = float((layer(x).argmax(1) == target).float().mean())
        log.info("class-probability head: %d classes, training loss %.3f, training accuracy %.3f",
                 len(classes), loss.item(), accuracy)
        return cls(layer.weight.detach().clone(), layer.bias.detach().clone(), classes)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float() @ self.weight.T + self.bias, dim=1)
