"""DropBack's selection on flat NumPy arrays: the maths both trainers share, without torch.

`DropBack` (the torch optimizer, `dropback.py`) and the lean runtime's trainer
(`lean/dropback.py`) both call `dropback_select` on their flat weight and
gradient buffers, so given the same weights and gradients they keep the same
tracked set and values, bit for bit. How the running threshold keeps the
selection exact and cheap: `dropback.py`'s module docstring.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dropfleet.common.errors import ConfigError

# The entry bar for untracked weights is this fraction of the last k-th score:
# lower means a slightly larger candidate pool but fewer exactness rescans.
THRESHOLD_MARGIN = 0.8


class Selection(NamedTuple):
    """What one DropBack step leaves behind: the tracked set and the next step's entry bar."""

    tracked: np.ndarray  # sorted flat positions (int64)
    initial: np.ndarray  # w0 at `tracked` (float32)
    threshold: float


class Scratch(NamedTuple):
    """N-sized work buffers, reused across steps so a step does not page-fault fresh ones."""

    step: np.ndarray  # float32: -lr * g
    score: np.ndarray  # float32: |w - w0| of untracked weights
    mask: np.ndarray  # bool: which of them beat the bar

    @classmethod
    def empty(cls, numel: int) -> "Scratch":
        return cls(np.empty(numel, np.float32), np.empty(numel, np.float32), np.empty(numel, bool))


def dropback_select(
    weights: np.ndarray,
    grads: np.ndarray,
    tracked: np.ndarray,
    initial: np.ndarray,
    *,
    lr: Sequence[tuple[int, float]],
    k: int,
    threshold: float = 0.0,
    frozen: bool = False,
    init_decay: float | None = None,
    scratch: Scratch | None = None,
) -> Selection:
    r"""One DropBack step on flat arrays: the functional core of `DropBack.step`.

    With :math:`s = -\eta g` (plain SGD's change; :math:`\eta` is the rate of
    the span a weight lies in), :math:`T` the tracked set and :math:`w_0` the
    initial values, every weight is scored after the SGD step:

    .. math::
        \sigma_i = |w_i + s_i - w_{0,i}|, \qquad
        \sigma_i = |s_i| \text{ for } i \notin T \text{ (an untracked weight sits at } w_{0,i}),

    the new tracked set :math:`T'` is the k highest :math:`\sigma_i`, and

    .. math::
        w_i \leftarrow w_i + s_i \ (i \in T'), \qquad w_i \leftarrow w_{0,i} \ (i \notin T').

    Ties at the k-th score are kept by one rule: weights of T before entrants,
    each in increasing flat index, and the first ones in that order are dropped
    first. The search only scores untracked weights with
    :math:`|s_i| > \text{threshold}` (exact: see the module docstring); the
    returned threshold is ``THRESHOLD_MARGIN`` times the k-th score.

    Frozen: :math:`T' = T`, :math:`w_i \leftarrow w_i - \eta g_i` for
    :math:`i \in T` only, and the threshold is returned unchanged. With
    ``init_decay`` :math:`d`, afterwards :math:`w_0 \leftarrow d\,w_0` and every
    untracked weight (it sits at :math:`w_0`) follows: :math:`w_i \leftarrow d\,w_i`.

    Args:
        weights: all N weights, float32; updated in place (as torch.optim.sgd's
            functional core updates its params).
        grads: the N gradients, float32; not written.
        tracked: the tracked set T, sorted unique flat positions (int64); not written.
        initial: w0 at `tracked` (float32); not written.
        lr: consecutive spans of the flat arrays and their learning rates, as
            (end, lr) pairs from offset 0 (one per param group); the last end is N.
        k: the tracked budget.
        threshold: the entry bar the previous step returned (0.0: score every weight).
        frozen: keep T and update only the tracked weights.
        init_decay: the factor d, or None (w0 stays).
        scratch: N-sized work buffers, overwritten; None allocates fresh ones.

    Returns:
        `Selection` of T' (sorted), w0 at T' and the next threshold: new arrays,
        or `tracked` and `initial` themselves when the step leaves the set as it
        was and there is no decay. Same inputs, same outputs, bit for bit.
    """
    if weights.shape != grads.shape or weights.ndim != 1:
        raise ConfigError(f"weights {weights.shape} and gradients {grads.shape} must be flat and alike")
    if tracked.shape != initial.shape:
        raise ConfigError(f"{tracked.size} tracked indices, {initial.size} initial values")
    if not lr or lr[-1][0] != weights.size:
        raise ConfigError(f"learning-rate spans must end at {weights.size}, got {list(lr)!r}")
    if frozen:
        _tracked_sgd(weights, grads, tracked, lr)
        new_tracked, new_initial, new_threshold = tracked, initial, threshold
    else:
        if scratch is None:
            scratch = Scratch.empty(weights.size)
        new_tracked, new_initial, new_threshold = _select(
            weights, grads, tracked, initial, lr, k, threshold, scratch
        )
    if init_decay is not None:
        # Untracked weights sit at w0 and tracked ones are scored against it: decay both.
        kept = weights[new_tracked]
        weights *= init_decay
        weights[new_tracked] = kept
        new_initial = new_initial * init_decay  # a new array: the caller's stays as it was
    return Selection(new_tracked, new_initial, new_threshold)


def _sgd_change(grads: np.ndarray, lr: Sequence[tuple[int, float]], out: np.ndarray) -> np.ndarray:
    """-lr * g for every weight, span by span: the change plain SGD would make."""
    start = 0
    for end, rate in lr:
        np.multiply(grads[start:end], -rate, out=out[start:end])
        start = end
    return out


def _tracked_sgd(
    weights: np.ndarray, grads: np.ndarray, tracked: np.ndarray, lr: Sequence[tuple[int, float]]
) -> None:
    """Plain SGD on the tracked weights only: O(k), the whole cost of a frozen step."""
    if len(lr) == 1:
        rate = lr[0][1]
        weights[tracked] -= rate * grads[tracked]
        return
    ends = np.searchsorted(tracked, [end for end, _ in lr])  # tracked is sorted
    start = 0
    for (_, rate), stop in zip(lr, ends, strict=True):
        idx = tracked[start:stop]
        weights[idx] -= rate * grads[idx]
        start = stop


def _select(
    weights: np.ndarray,
    grads: np.ndarray,
    tracked: np.ndarray,
    initial: np.ndarray,
    lr: Sequence[tuple[int, float]],
    k: int,
    threshold: float,
    scratch: Scratch,
) -> tuple[np.ndarray, np.ndarray, float]:
    step = _sgd_change(grads, lr, scratch.step)
    moved = weights[tracked] + step[tracked]  # tracked weights after plain SGD
    score_tracked = np.abs(moved - initial)
    score = np.abs(step, out=scratch.score)  # |w - w0| of an untracked weight
    score[tracked] = 0.0  # tracked weights are scored separately
    while True:
        entrants = np.flatnonzero(np.greater(score, threshold, out=scratch.mask))
        n_pool = tracked.size + entrants.size
        pool_score = np.concatenate([score_tracked, score[entrants]])
        if n_pool < k:
            if threshold > 0.0:  # weights below the bar are needed to fill k
                threshold = 0.0
                continue
            kth = 0.0
            keep = np.ones(n_pool, dtype=bool)
            break
        kth = float(np.partition(pool_score, n_pool - k)[n_pool - k])
        if kth >= threshold:  # nothing outside the pool can beat the k-th score
            keep = pool_score >= kth
            surplus = int(keep.sum()) - k
            if surplus > 0:  # ties at the k-th score: keep exactly k
                keep[np.flatnonzero(pool_score == kth)[:surplus]] = False
            break
        threshold = kth  # tracked scores fell below the bar: rescan once, lower
    keep_tracked, keep_entrants = keep[: tracked.size], keep[tracked.size :]
    new_entrants = entrants[keep_entrants]
    next_threshold = kth * THRESHOLD_MARGIN  # a bar a little under the k-th score avoids most rescans
    if new_entrants.size == 0 and bool(keep_tracked.all()):  # the set stays: only its weights move
        weights[tracked] = moved
        return tracked, initial, next_threshold
    # Kept weights take the SGD step; tracked weights that drop return to w0
    # exactly; untracked weights sit at w0, which is what entrants record.
    weights[tracked] = np.where(keep_tracked, moved, initial)
    entrant_initial = weights[new_entrants]
    weights[new_entrants] += step[new_entrants]
    new_tracked, new_initial = _merge_sorted(
        tracked[keep_tracked], initial[keep_tracked], new_entrants, entrant_initial
    )
    return new_tracked, new_initial, next_threshold


def _merge_sorted(
    a_idx: np.ndarray, a_val: np.ndarray, b_idx: np.ndarray, b_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted, disjoint index sets and their values as one sorted set, in O(len) (no sort)."""
    if b_idx.size == 0:
        return a_idx, a_val
    n = a_idx.size + b_idx.size
    at = np.searchsorted(a_idx, b_idx) + np.arange(b_idx.size)  # where b's entries land
    from_a = np.ones(n, dtype=bool)
    from_a[at] = False
    idx, val = np.empty(n, np.int64), np.empty(n, np.float32)
    idx[at], idx[from_a] = b_idx, a_idx
    val[at], val[from_a] = b_val, a_val
    return idx, val
