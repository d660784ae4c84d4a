"""Query expansion (alpha-QE) and database-side augmentation (alpha-DBA) of float descriptors.

Radenovic, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation" (TPAMI 2018), and
their cnnimageretrieval-pytorch code:

- alpha-QE: a query is replaced by the L2-normalised weighted sum of itself (weight 1) and its top n database
  neighbours, neighbour i weighted by s_i ** alpha, s_i its similarity to the query; then searched again.
- alpha-DBA: every database vector is replaced, once, by the L2-normalised weighted sum of itself (weight 1)
  and its top n database neighbours (itself excluded), with the same weights.

Both assume inner-product similarities of L2-normalised descriptors. A negative similarity is clipped to 0
before the power (a non-integer power of a negative number is undefined, and a dissimilar neighbour should
not pull the query away); with n = 0 nothing changes. DBA comes first, so QE expands with augmented
neighbours, as in the paper. Neighbours are found exactly, a block of rows at a time
(:meth:`retrieval.search.scores.ScoreSource.top_k`: equal scores in ascending database index), so memory stays
bounded; the cost is that of one more search of the database (QE) or of the database against itself (DBA).

Leave-one-out benchmarks (the queries are the database): a query's own database copy must not be one of its
expansion neighbours; it would be the first of them, with weight ~1, so the query would mostly be added to
itself, unlike a query that is not in the database. ``exclude_self`` drops row i from query i's neighbours
(the evaluation already leaves that row out of the ranking). DBA needs no such care: it changes database
items only, whoever queries them.
"""
from __future__ import annotations

import logging

import numpy as np

from msretrieval.utils.errors import UserError

from msretrieval.retrieval.descriptors.methods import RetrievalMethod
from msretrieval.retrieval.search.scores import InnerProductScores

log = logging.getLogger(__name__)

#: rows whose neighbour vectors (rows x n x D) are gathered at once
_ROWS_PER_BLOCK = 1024


def _neighbours(queries: np.ndarray, database: np.ndarray, n: int, exclude_self: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Q, n): the top n database items of every query, without item i for
    query i if ``exclude_self``."""
    scores, indices = InnerProductScores(queries, database).top_k(n + exclude_self)
    if not exclude_self:
        return scores, indices
    own = indices == np.arange(len(indices))[:, None]
    # the first n entries that are not the query's own row (a stable sort keeps their order)
    keep = np.argsort(own, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(scores, keep, 1), np.take_along_axis(indices, keep, 1)


def _weighted_sums(vectors: np.ndarray, database: np.ndarray, similarities: np.ndarray, indices: np.ndarray,
                   alpha: float) -> np.ndarray:
    """normalise(v_i + sum_j max(s_ij, 0) ** alpha * database[indices_ij]) for every row i."""
    weights = np.maximum(similarities, 0).astype(np.float64) ** alpha
    out = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, len(vectors), _ROWS_PER_BLOCK):
        stop = start + _ROWS_PER_BLOCK
        summed = vectors[start:stop].astype(np.float64) + np.einsum(
            "qn,qnd->qd", weights[start:stop], database[indices[start:stop]].astype(np.float64))
        norms = np.linalg.norm(summed, axis=1, keepdims=True)
        out[start:stop] = summed / np.maximum(norms, np.finfo(np.float64).tiny)  # a zero sum stays zero
    return out


def query_expansion(queries: np.ndarray, database: np.ndarray, n: int, alpha: float = 3.0,
                    exclude_self: bool = False) -> np.ndarray:
    """alpha-QE: each query -> normalise(query + sum over its top n of similarity ** alpha x neighbour)."""
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)
    if n == 0 or len(database) == 0:
        return queries.copy()
    n = min(n, len(database) - exclude_self)
    if n < 1:
        return queries.copy()
    similarities, indices = _neighbours(queries, database, n, exclude_self)
    return _weighted_sums(queries, database, similarities, indices, alpha)


def database_augmentation(database: np.ndarray, n: int, alpha: float = 3.0) -> np.ndarray:
    """alpha-DBA: each database vector -> normalise(itself + sum over its top n other database vectors of
    similarity ** alpha x neighbour)."""
    return query_expansion(database, database, n, alpha, exclude_self=True)


def ranks_by_inner_product(method: RetrievalMethod, queries: np.ndarray, database: np.ndarray) -> bool:
    """Float descriptors compared by their inner product (the method's scores on one row say so)."""
    return method.descriptor_kind == "float32" and \
        isinstance(method.scores(queries[:1], database[:1]), InnerProductScores)


def postprocess(settings, method: RetrievalMethod, queries: np.ndarray, database: np.ndarray,
                leave_one_out: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """DBA then QE as ``settings`` asks (``query_expansion``, ``qe_alpha``, ``dba``, ``dba_alpha``):
    (queries, database, what was applied, for the results' config; empty if nothing).

    Only for methods ranking float descriptors by inner product: for any other method (binary codes,
    regional or kernel scores, dissimilarities) it refuses, in one line, rather than skip: a results table
    that mixes expanded and plain methods under one setting would compare unlike things."""
    if not (settings.query_expansion or settings.dba):
        return queries, database, {}
    if not ranks_by_inner_product(method, queries, database):
        raise UserError(f"query expansion / DBA apply to float descriptors ranked by inner product; method "
                        f"{method.name} is not one (evaluate it in a run without --qe / --dba)")
    if settings.dba:
        log.info("%s: alpha-DBA of %d database vectors (n = %d, alpha = %g)", method.name, len(database),
                 settings.dba, settings.dba_alpha)
        database = database_augmentation(database, settings.dba, settings.dba_alpha)
    if settings.query_expansion:
        log.info("%s: alpha-QE of %d queries (n = %d, alpha = %g%s)", method.name, len(queries),
                 settings.query_expansion, settings.qe_alpha, ", own database copy excluded" if leave_one_out else "")
        queries = query_expansion(queries, database, settings.query_expansion, settings.qe_alpha,
                                  exclude_self=leave_one_out)
    applied = {"query_expansion": settings.query_expansion, "qe_alpha": settings.qe_alpha, "dba": settings.dba,
               "dba_alpha": settings.dba_alpha, "qe_excludes_own_copy": leave_one_out}
    return queries, database, {"postprocess": applied}
