"""Metric-learning and deep hashing losses, configured from pytorch-metric-learning (PML) pieces.

Every loss is a PML loss and is called PML-style: ``loss(embeddings, labels, indices_tuple=None)``.
Build them by name with :func:`losses.factory.create_loss`.
"""
from .contrastive import CirtorchContrastiveLoss, euclidean_distance
from .factory import LOSS_NAMES, REDUCER_NAMES, create_loss, create_reducer
from .hashing import (CSQLoss, DPSHLoss, HashingLoss, QuantizedLoss, SimilarityDistillation, bit_balance,
                      hadamard_matrix, hash_centres, quantization_errors, similarity_distillation)
from .triplet import SquaredEuclideanTripletLoss, squared_euclidean_distance

__all__ = ["LOSS_NAMES", "REDUCER_NAMES", "CSQLoss", "CirtorchContrastiveLoss", "DPSHLoss", "HashingLoss",
           "QuantizedLoss", "SimilarityDistillation", "SquaredEuclideanTripletLoss", "bit_balance", "create_loss",
           "create_reducer", "euclidean_distance", "hadamard_matrix", "hash_centres", "quantization_errors",
           "similarity_distillation", "squared_euclidean_distance"]
