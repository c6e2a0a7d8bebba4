"""Merging sparse client models into the next published global tracked set.

Semantics (tested against a dense reference in tests/common/test_merge.py):
each client model is w0 + delta_i with delta_i zero outside its tracked set.
The merged model is the examples-weighted average of the client models,

    delta[j] = sum_i n_i * delta_i[j] / sum_i n_i     (untracked: delta_i[j] = 0)

and the published global set keeps the K entries with the largest |delta|
(ties broken by lower flat index), K being the global budget, which may exceed
any client's k. Cost grows with the total number of tracked entries received
(M * k), never with M * N.
"""

from collections.abc import Sequence

import numpy as np

from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.sparse import SparseModel, SparseTensor


def _flat_offsets(model: SparseModel) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([t.numel for t in model.tensors])]).astype(np.int64)


def merge_sparse(updates: Sequence[tuple[SparseModel, float]], global_k: int) -> SparseModel:
    """Examples-weighted average of sparse client models, trimmed to the top `global_k`."""
    if not updates:
        raise ConfigError("nothing to merge")
    if global_k < 0:
        raise ConfigError(f"global_k must be >= 0, got {global_k}")
    first = updates[0][0]
    for model, weight in updates:
        if (model.model_id, model.seed, model.init_scheme) != (first.model_id, first.seed, first.init_scheme):
            raise WireFormatError("updates disagree on model id, seed or init scheme")
        if not (np.isfinite(weight) and weight > 0):
            raise ConfigError(f"update weights must be finite and > 0, got {weight}")
    offsets = _flat_offsets(first)
    total = float(sum(w for _, w in updates))
    idx = np.concatenate(
        [t.indices.astype(np.int64) + offsets[i] for m, _ in updates for i, t in enumerate(m.tensors)]
    )
    val = np.concatenate([t.values.astype(np.float64) * (w / total) for m, w in updates for t in m.tensors])
    positions, inverse = np.unique(idx, return_inverse=True)
    mean = np.bincount(inverse, weights=val, minlength=positions.size)
    nonzero = mean != 0.0
    positions, mean = positions[nonzero], mean[nonzero]
    if positions.size > global_k:
        # Sort by (-|delta|, index): deterministic choice at the K-th score.
        order = np.lexsort((positions, -np.abs(mean)))[:global_k]
        order.sort()
        positions, mean = positions[order], mean[order]
    return _split(first, positions, mean.astype(np.float32))


def _split(template: SparseModel, positions: np.ndarray, values: np.ndarray) -> SparseModel:
    offsets = _flat_offsets(template)
    bounds = np.searchsorted(positions, offsets)
    tensors = tuple(
        SparseTensor(
            t.name,
            t.shape,
            positions[bounds[i] : bounds[i + 1]] - offsets[i],
            values[bounds[i] : bounds[i + 1]],
        )
        for i, t in enumerate(template.tensors)
    )
    return SparseModel(
        seed=template.seed, model_id=template.model_id, tensors=tensors, init_scheme=template.init_scheme
    )


def flat_positions(model: SparseModel) -> np.ndarray:
    """Tracked positions as sorted flat indices over the whole model."""
    offsets = _flat_offsets(model)
    return np.concatenate([t.indices.astype(np.int64) + offsets[i] for i, t in enumerate(model.tensors)])


def churn(previous: SparseModel, current: SparseModel) -> float:
    """Fraction of the current tracked set that was not tracked before (0 when empty)."""
    now = flat_positions(current)
    if now.size == 0:
        return 0.0
    return float(np.setdiff1d(now, flat_positions(previous), assume_unique=True).size / now.size)
