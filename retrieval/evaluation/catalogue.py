"""Every method the harness can build by name: importing this module registers them all.

:mod:`retrieval.descriptors.methods` holds the registry and knows none of the methods defined above it; each module that
defines methods registers them when it is imported. Entry points (``scripts/evaluate.py``, the trainer's
evaluation) take :func:`create_method` and :func:`available_methods` from here, so every name is there.
"""
from __future__ import annotations

import msretrieval.baselines  # noqa: F401  (scda*, msbd*, itq)
import msretrieval.retrieval.aggregation.match_kernels  # noqa: F401  (vlad, asmk, asmk_star, r_*)
import msretrieval.retrieval.aggregation.regional  # noqa: F401  (regional_search_*)
import msretrieval.retrieval.descriptors.code_search  # noqa: F401  (asym:, rerank@R:)
import msretrieval.retrieval.descriptors.trained  # noqa: F401  (run:, model:, itq@, pca@, pcasign@)
from msretrieval.retrieval.descriptors.methods import MethodContext, available_methods, create_method

__all__ = ["MethodContext", "available_methods", "create_method"]
