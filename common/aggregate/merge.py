"""Merging sparse client models into the next published global tracked set.

Semantics (tested against a dense reference in tests/common/aggregate/test_merge.py):
each client model is w0 + delta_i with delta_i zero outside its tracked set.
The merged model is the examples-weighted average of the client models,

    delta[j] = sum_i n_i * delta_i[j] / sum_i n_i     (untracked: delta_i[j] = 0)

and the published global set keeps the K entries with the largest |delta|
(ties broken by lower flat index), K being the global budget, which may exceed
any client's k. Cost grows with the total number of tracked entries received
(M * k), never with M * N.

With `rule="tracked-mean"` the average at j runs over the clients that track j
only (weights renormalized there).

Robust options against poisoning clients (run config `aggregation`,
`trim-fraction`, `clip-norm`):
- `clip_norm`: each client's delta vector is scaled down to at most this L2 norm first;
- `rule="median"`: coordinate-wise median over the clients that track the coordinate;
- `rule="trimmed-mean"`: coordinate-wise mean over the clients that track the
  coordinate, after dropping the `trim` fraction of lowest and of highest values.
"""

from collections.abc import Sequence

import numpy as np

from dropfleet.common.aggregate.server_opt import ServerOptimizer
from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.model.sparse import SparseModel, from_positions

RULES = ("mean", "tracked-mean", "median", "trimmed-mean")


def merge_sparse(
    updates: Sequence[tuple[SparseModel, float]],
    global_k: int,
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float | None = None,
) -> SparseModel:
    """Examples-weighted average (or a robust rule) of sparse client models, top `global_k` kept."""
    if global_k < 0:
        raise ConfigError(f"global_k must be >= 0, got {global_k}")
    positions, values = combine(updates, rule, trim, clip_norm)
    positions, values = top_k(positions, values, global_k)
    return from_positions(updates[0][0], positions, values)


def next_global(
    previous: SparseModel,
    updates: Sequence[tuple[SparseModel, float]],
    global_k: int,
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float | None = None,
    server_opt: ServerOptimizer | None = None,
) -> SparseModel:
    """A round's new global tracked set: merge, optional server momentum, then the top `global_k`."""
    merged = combine(updates, rule, trim, clip_norm)
    if server_opt is not None:
        published = previous.flat_positions(), previous.flat_values()
        merged = server_opt.step(published, merged)
    return from_positions(previous, *top_k(*merged, global_k))


def combine(
    updates: Sequence[tuple[SparseModel, float]],
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The merged delta before the global budget: sorted global positions and float64 values.

    `mean` divides by every update's weight (untracked counts as 0, the
    paper's rule); `tracked-mean` only by the weights of the updates that
    track the coordinate, so a coordinate few devices track is not shrunk
    toward w0 by the devices that do not.
    """
    if rule not in RULES:
        raise ConfigError(f"aggregation rule must be one of {RULES}, got {rule!r}")
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trim fraction must be in [0, 0.5), got {trim}")
    if clip_norm is not None and not clip_norm > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip_norm}")
    if not updates:
        raise ConfigError("nothing to merge")
    first = updates[0][0]
    for model, weight in updates:
        if (model.model_id, model.seed, model.init_scheme) != (first.model_id, first.seed, first.init_scheme):
            raise WireFormatError("updates disagree on model id, seed or init scheme")
        if model.base_version:
            raise WireFormatError("change-coded update: resolve it against its global first (common/uplink)")
        if not (np.isfinite(weight) and weight > 0):
            raise ConfigError(f"update weights must be finite and > 0, got {weight}")
    total = float(sum(w for _, w in updates))
    idx = np.concatenate([m.flat_positions() for m, _ in updates])
    scale = [_clip_factor(m, clip_norm) for m, _ in updates]
    raw = np.concatenate(
        [t.values.astype(np.float64) * c for (m, _), c in zip(updates, scale, strict=True) for t in m.tensors]
    )
    positions, inverse = np.unique(idx, return_inverse=True)
    if rule in ("mean", "tracked-mean"):
        weights = np.concatenate([np.full(m.num_tracked, w) for m, w in updates])
        sums = np.bincount(inverse, weights=raw * weights, minlength=positions.size)
        if rule == "mean":
            merged = sums / total
        else:
            merged = sums / np.bincount(inverse, weights=weights, minlength=positions.size)
    else:
        merged = _robust(inverse, raw, positions.size, 0.0 if rule == "median" else trim, rule == "median")
    nonzero = merged != 0.0
    return positions[nonzero], merged[nonzero]


def top_k(positions: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k entries largest in |value|, ties to the lower position, in position order."""
    if positions.size <= k:
        return positions, values
    # Sort by (-|value|, position): deterministic choice at the k-th score.
    order = np.lexsort((positions, -np.abs(values)))[:k]
    order.sort()
    return positions[order], values[order]


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


def churn(previous: SparseModel, current: SparseModel) -> float:
    """Fraction of the current tracked set that was not tracked before (0 when empty)."""
    now = current.flat_positions()
    if now.size == 0:
        return 0.0
    return float(np.setdiff1d(now, previous.flat_positions(), assume_unique=True).size / now.size)
