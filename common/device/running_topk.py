"""The running top-k of a streaming DropBack step: one rule, a NumPy reference and a compiled kernel.

Streaming DropBack scores a model block by block in backward and must know the
step's k best weights when backward ends, holding only k candidates. The rule
is total, so the result never depends on how a library breaks ties: a weight
ranks above another when its score |w - w0| is higher or, at equal scores,
when it was scored earlier in the step (a sequence number counts the weights
in the order blocks are offered: last layer first, rows in order). Ties are
common (constant input pixels give whole rows of equal gradients), so both
implementations keep exactly this rule and produce the same bits.

`RunningTopK` is the reference: each block's contenders are merged with a
lexicographic sort. `CompiledTopK` keeps the candidates in a preallocated
min-heap (worst at the root) and scores a block in one compiled pass with no
allocations; it needs numba (`pip install dropfleet[fast]`), as the compiled
init kernel does, and `make()` falls back to the reference without it.
"""

import logging
import os
from collections.abc import Callable
from functools import cache

import numpy as np

log = logging.getLogger(__name__)
Array = np.ndarray


class RunningTopK:
    """The k best weights offered so far in one step (NumPy reference)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.index = np.zeros(0, np.int64)
        self.value = np.zeros(0, np.float32)
        self.score = np.zeros(0, np.float32)
        self.seq = np.zeros(0, np.int64)
        self.seen = 0

    def offer(
        self, base: int, step: np.ndarray, w0: np.ndarray, local: np.ndarray, moved: np.ndarray
    ) -> None:
        """Score one block after its SGD step and keep the k best so far.

        `step` (-lr * gradient) and `w0` cover global flat indices [base, base + n);
        `local` (sorted) are the block positions of tracked weights, `moved` their
        values after the step. An untracked weight sits at w0: its score is |step|.
        """
        n = step.size
        score = np.abs(step)
        new = w0 + step
        if local.size:
            score[local] = np.abs(moved - w0[local])
            new[local] = moved
        seq = self.seen + np.arange(n, dtype=np.int64)
        self.seen += n
        keep = score >= np.partition(score, n - self.k)[n - self.k] if n > self.k else np.ones(n, bool)
        if self.score.size >= self.k:  # a later weight must score strictly higher than the worst kept
            keep &= score > self.score.min()
        pick = np.flatnonzero(keep)  # below the block's own k-th: beaten by k weights of the block
        index = np.concatenate([self.index, base + pick.astype(np.int64)])
        value = np.concatenate([self.value, new[pick]])
        score_all = np.concatenate([self.score, score[pick]])
        seq_all = np.concatenate([self.seq, seq[pick]])
        if score_all.size > self.k:
            keep = np.lexsort((seq_all, -score_all))[: self.k]
            index, value, score_all, seq_all = index[keep], value[keep], score_all[keep], seq_all[keep]
        self.index, self.value, self.score, self.seq = index, value, score_all, seq_all

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept global indices (sorted, int64) and their new values."""
        order = np.argsort(self.index, kind="stable")
        return self.index[order], self.value[order]


def _better(score, seq, a, b):  # noqa: ANN001, ANN202 (numba kernel)
    """Whether candidate a ranks above candidate b: higher score, then scored earlier."""
    return score[a] > score[b] or (score[a] == score[b] and seq[a] < seq[b])


def _swap(c_index, c_value, c_score, c_seq, a, b):  # noqa: ANN001, ANN202 (numba kernel)
    c_index[a], c_index[b] = c_index[b], c_index[a]
    c_value[a], c_value[b] = c_value[b], c_value[a]
    c_score[a], c_score[b] = c_score[b], c_score[a]
    c_seq[a], c_seq[b] = c_seq[b], c_seq[a]


def _keep_best(c_index, c_value, c_score, c_seq, count, k):  # noqa: ANN001, ANN202 (numba kernel)
    """Move the k best of the first `count` candidates to the front; return their lowest score."""
    lo, hi = 0, count - 1
    while lo < hi:  # invariant: the k best lie in [0, hi], and [0, lo) holds only members of them
        mid = (lo + hi) // 2
        _swap(c_index, c_value, c_score, c_seq, mid, hi)  # pivot to the end (Lomuto)
        store = lo
        for i in range(lo, hi):
            if _better(c_score, c_seq, i, hi):
                _swap(c_index, c_value, c_score, c_seq, i, store)
                store += 1
        _swap(c_index, c_value, c_score, c_seq, store, hi)
        if store == k - 1:
            break
        if store < k - 1:
            lo = store + 1
        else:
            hi = store - 1
    floor = c_score[0]
    for i in range(1, k):
        floor = min(floor, c_score[i])
    return floor


def _kth_largest(values, n, k):  # noqa: ANN001, ANN202 (numba kernel)
    """The k-th largest of values[:n] (1 <= k <= n), by quickselect in place (values are scrambled)."""
    lo, hi, target = 0, n - 1, k - 1  # descending order: position k - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return values[target]
    return values[target]


def _offer(base, step, w0, local, moved, seq0, c_index, c_value, c_score, c_seq, state, floor, scratch):  # noqa: ANN001, ANN202
    """`RunningTopK.offer`'s rule in compiled passes, with no allocations.

    The candidates live in buffers of 1.5k entries (state[0] of them in use):
    a weight joins when it scores above `floor[0]`, the lowest score kept at
    the last compaction (a later weight with an equal score ranks below it);
    a full buffer is compacted to its k best by quickselect. A block larger
    than k first finds its own k-th score (`scratch`): a weight below it is
    beaten by k weights of its own block.
    """
    k = state[1]
    n = step.size
    count = state[0]
    bar = floor[0]
    if n > k:
        p = 0
        for j in range(n):
            if p < local.size and local[p] == j:
                scratch[j] = abs(moved[p] - w0[j])
                p += 1
            else:
                scratch[j] = abs(step[j])
        own = _kth_largest(scratch, n, k)
        if own > bar:  # below the block's own k-th: out; at it: ties, which the compaction orders
            bar = np.nextafter(own, np.float32(-np.inf))
    p = 0
    for j in range(n):
        if p < local.size and local[p] == j:
            new = moved[p]
            score = abs(new - w0[j])
            p += 1
        else:
            new = w0[j] + step[j]
            score = abs(step[j])
        if score <= bar:
            continue
        if count == c_index.size:
            floor[0] = _keep_best(c_index, c_value, c_score, c_seq, count, k)
            count = k
            bar = max(bar, floor[0])
            if score <= bar:
                continue
        c_index[count], c_value[count], c_score[count], c_seq[count] = base + j, new, score, seq0 + j
        count += 1
    state[0] = count


@cache
def kernel() -> Callable[..., None] | None:
    """The compiled `_offer`, or None (numba missing or disabled: the reference runs).

    The helpers are compiled first and put in this module's namespace, where
    `_offer` finds them when it compiles: direct calls numba can inline.
    """
    if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:
        return None
    options = {"fastmath": False, "nogil": True, "error_model": "numpy"}
    namespace = globals()
    try:
        for name in ("_better", "_swap", "_keep_best", "_kth_largest", "_offer"):
            try:
                namespace[name] = numba.njit(cache=True, **options)(namespace[name])
            except RuntimeError:  # no writable cache directory: compile per process
                namespace[name] = numba.njit(**options)(namespace[name])
        one = np.ones(2, np.float32)  # compile now, so a broken toolchain falls back here
        CompiledTopK(1, namespace["_offer"]).offer(
            0, one, one, np.zeros(0, np.int64), np.zeros(0, np.float32)
        )
    except Exception as exc:
        log.warning("numba could not compile the running top-k (%s): using the NumPy reference", exc)
        return None
    return namespace["_offer"]


def make(k: int, backend: str = "auto") -> "RunningTopK | CompiledTopK":
    """A running top-k of k entries: compiled where numba is there (unless `backend` is "numpy")."""
    compiled = kernel() if backend != "numpy" else None
    return CompiledTopK(k, compiled) if compiled is not None else RunningTopK(k)


class CompiledTopK:
    """`RunningTopK`'s rule in preallocated buffers of 1.5k candidates, scored by a compiled kernel.

    16 bytes per candidate (int32 index and sequence number: models below 2**31 weights).
    """

    def __init__(self, k: int, offer: Callable[..., None]) -> None:
        self.k = k
        self._offer = offer
        capacity = k + max(1, k // 2)  # room for k // 2 joiners between compactions
        self.c_index = np.empty(capacity, np.int32)
        self.c_value = np.empty(capacity, np.float32)
        self.c_score = np.empty(capacity, np.float32)
        self.c_seq = np.empty(capacity, np.int32)
        self.state = np.array([0, k], np.int64)  # entries in use, k
        self.floor = np.full(1, -1.0, np.float32)  # scores are >= 0: everything joins until a compaction
        self.scratch = np.empty(0, np.float32)  # grows to the largest block larger than k
        self.seen = 0

    def offer(self, base: int, step: Array, w0: Array, local: Array, moved: Array) -> None:
        if step.size > self.k and self.scratch.size < step.size:
            self.scratch = np.empty(step.size, np.float32)
        self._offer(
            np.int64(base), step, w0, local, moved, np.int64(self.seen),
            self.c_index, self.c_value, self.c_score, self.c_seq, self.state, self.floor, self.scratch,
        )  # fmt: skip
        self.seen += step.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        count = int(self.state[0])
        if count > self.k:
            _keep_best(self.c_index, self.c_value, self.c_score, self.c_seq, count, self.k)
            count = self.k
        order = np.argsort(self.c_index[:count], kind="stable")
        return self.c_index[:count][order].astype(np.int64), self.c_value[:count][order]
