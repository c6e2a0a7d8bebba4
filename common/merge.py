"""Merging sparse client models into the next published global tracked set.

Semantics (tested against a dense reference in tests/common/test_merge.py):
each client model is w0 + delta_i with delta_i zero outside its tracked set.
The merged model is the examples-weighted average of the client models,

    delta[j] = sum_i n_i * delta_i[j] / sum_i n_i     (untracked: delta_i[j] = 0)

and the published global set keeps the K entries with the largest |delta|
(ties broken by lower flat index), K being the global budget, which may exceed
any client's k. Cost grows with the total number of tracked entries received
(M * k), never with M * N.

Robust options against poisoning clients (run config `aggregation`,
`trim-fraction`, `clip-norm`):
- `clip_norm`: each client's delta vector is scaled down to at most this L2 norm first;
- `rule="median"`: coordinate-wise median over the clients that track the coordinate;
- `rule="trimmed-mean"`: coordinate-wise mean over the clients that track the
  coordinate, after dropping the `trim` fraction of lowest and of highest values.
"""

from collections.abc import Sequence

import numpy as np

from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.sparse import SparseModel, SparseTensor

RULES = ("mean", "median", "trimmed-mean")


def merge_sparse(
    updates: Sequence[tuple[SparseModel, float]],
    global_k: int,
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float | None = None,
) -> SparseModel:
    """Examples-weighted average (or a robust rule) of sparse client models, top `global_k` kept."""
    if rule not in RULES:
        raise ConfigError(f"aggregation rule must be one of {RULES}, got {rule!r}")
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trim fraction must be in [0, 0.5), got {trim}")
    if clip_norm is not None and not clip_norm > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip_norm}")
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
    total = float(sum(w for _, w in updates))
    idx = np.concatenate([m.flat_positions() for m, _ in updates])
    scale = [_clip_factor(m, clip_norm) for m, _ in updates]
    raw = np.concatenate(
        [t.values.astype(np.float64) * c for (m, _), c in zip(updates, scale, strict=True) for t in m.tensors]
    )
    positions, inverse = np.unique(idx, return_inverse=True)
    if rule == "mean":
        weights = np.concatenate([np.full(m.num_tracked, w / total) for m, w in updates])
        mean = np.bincount(inverse, weights=raw * weights, minlength=positions.size)
    else:
        mean = _robust(inverse, raw, positions.size, 0.0 if rule == "median" else trim, rule == "median")
    nonzero = mean != 0.0
    positions, mean = positions[nonzero], mean[nonzero]
    if positions.size > global_k:
        # Sort by (-|delta|, index): deterministic choice at the K-th score.
        order = np.lexsort((positions, -np.abs(mean)))[:global_k]
        order.sort()
        positions, mean = positions[order], mean[order]
    return _split(first, positions, mean.astype(np.float32))


def _clip_factor(model: SparseModel, clip_norm: float | None) -> float:
    if clip_norm is None:
        return 1.0
    norm = float(np.sqrt(sum(float(np.dot(t.values.astype(np.float64), t.values)) for t in model.tensors)))
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def _robust(group: np.ndarray, values: np.ndarray, n_groups: int, trim: float, median: bool) -> np.ndarray:
    """Per group (coordinate): the median, or the mean after trimming both tails."""
    order = np.lexsort((values, group))
    g, v = group[order], values[order]
    counts = np.bincount(g, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if median:
        lo = starts + (counts - 1) // 2
        hi = starts + counts // 2
        return (v[lo] + v[hi]) / 2.0
    rank = np.arange(v.size) - starts[g]
    cut = np.floor(trim * counts).astype(np.int64)
    keep = (rank >= cut[g]) & (rank < (counts - cut)[g])
    sums = np.bincount(g, weights=np.where(keep, v, 0.0), minlength=n_groups)
    return sums / (counts - 2 * cut)


def _split(template: SparseModel, positions: np.ndarray, values: np.ndarray) -> SparseModel:
    b = template.layout.bounds(positions)
    tensors = tuple(
        SparseTensor(t.name, t.shape, positions[b[i] : b[i + 1]] - t.offset, values[b[i] : b[i + 1]])
        for i, t in enumerate(template.layout.tensors)
    )
    return SparseModel(
        seed=template.seed, model_id=template.model_id, tensors=tensors, init_scheme=template.init_scheme
    )


def churn(previous: SparseModel, current: SparseModel) -> float:
    """Fraction of the current tracked set that was not tracked before (0 when empty)."""
    now = current.flat_positions()
    if now.size == 0:
        return 0.0
    return float(np.setdiff1d(now, previous.flat_positions(), assume_unique=True).size / now.size)
