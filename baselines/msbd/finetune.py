"""Optional fine-tuning of the FEN as a classifier on the training split (the paper fine-tunes VGG-16 with
a fully connected + softmax layer on each data set). Off by default: it is slow on a CPU.

Batches hold images of one size (aspect ratios are kept), random horizontal flips; batch-norm statistics
stay frozen (small batches). The head is discarded afterwards: the class probabilities come from the light
classifier fitted on the (fine-tuned) frozen features, see classifier.py.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msretrieval.data.datasets import ImageDataset
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler, output_sizes

from .fen import FEN

log = logging.getLogger(__name__)

#: logits = scale * head(unit-norm descriptor): unit-norm inputs otherwise give nearly flat softmaxes
_LOGIT_SCALE = 16.0


def finetune_fen(fen: FEN, dataset: ImageDataset, labels, steps: int, lr: float, batch_size: int,
                 seed: int = 0) -> None:
    classes, targets = np.unique(np.asarray(labels), return_inverse=True)
    if len(targets) != len(dataset):
        raise ValueError(f"{len(targets)} labels for {len(dataset)} training images")
    device = next(fen.parameters()).device
    head = nn.Linear(fen.dim, len(classes)).to(device)
    optimiser = torch.optim.SGD([*fen.parameters(), *head.parameters()], lr=lr, momentum=0.9, weight_decay=5e-4)
    batches = SizeBucketBatchSampler(output_sizes(dataset), batch_size).batches
    rng = np.random.default_rng(seed)
    fen.train()
    for module in fen.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    with torch.enable_grad():
        for step in range(steps):
            batch = batches[rng.integers(len(batches))]
            images = torch.stack([dataset[i][0] for i in batch]).to(device)
            flip = torch.from_numpy(rng.random(len(batch)) < 0.5).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = F.cross_entropy(_LOGIT_SCALE * head(fen(images)), torch.from_numpy(targets[batch]).to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log.info("FEN fine-tuning step %d/%d: loss %.3f", step + 1, steps, loss.item())
    fen.eval()
