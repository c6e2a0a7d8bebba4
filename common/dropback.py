"""DropBack (Golub, Lemieux & Lis, arXiv 1806.06949) as a PyTorch optimizer.

Plain SGD, but only k weights of the whole model (one global budget across all
parameters and groups) may leave their initial value w0. After each SGD update
every weight is scored by |w - w0| (the accumulated gradient times lr); the k
highest stay tracked and every other weight is put back to w0, not to zero.

The optimizer never holds a dense w0. Untracked weights already sit at w0 in
the dense working tensors, so the state is the tracked flat indices and w0 at
those k positions only: O(k), not O(N). Keeping w0 (not the delta) for tracked
weights makes a dropped weight return to w0 bit for bit.

Selection is exact top-k, made cheap by a running threshold t (the k-th score
of the previous step): an untracked weight can only enter the tracked set if
its one-step score lr*|g| exceeds t, so one compare over N weights finds the
few candidates, and the top-k is taken over the k tracked weights plus those
candidates. If the k-th score of that pool falls below t, weights outside the
pool could qualify, so the pool is rebuilt once with the lower threshold,
which makes the result exact (ties broken by position in the pool).

To make a step a handful of vectorized passes instead of a loop over tensors,
the optimizer moves its parameters (and their gradients) into one flat buffer
each and leaves every parameter a view into it; `zero_grad` zeroes the flat
gradient buffer in place. Create the optimizer after moving the model to its
device and dtype.

After `freeze_after` steps (or an explicit `freeze()`) the tracked set is
frozen: only tracked weights are updated and no selection runs.
"""

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from dropfleet.common.errors import ConfigError
from dropfleet.common.footprint import Footprint
from dropfleet.common.layout import Layout

# Bytes kept per tracked weight between steps (int64 index + float32 w0) and fixed
# overhead (threshold, counters, seed).
BYTES_PER_TRACKED = 12
FIXED_STATE_BYTES = 64
# A step's peak, per weight of the model: weights, gradient and step/score/mask
# scratch are held (17 B); the first step of a round scores every weight against
# a zero bar, so its candidate indices, scores and partition copies add ~20 B.
STEP_BYTES_PER_WEIGHT = 38
# Per tracked weight in a step: what is kept plus the selection's pool temporaries.
STEP_BYTES_PER_TRACKED = 48
# The entry bar for untracked weights is this fraction of the last k-th score:
# lower means a slightly larger candidate pool but fewer exactness rescans.
THRESHOLD_MARGIN = 0.8


class DropBack(Optimizer):
    """SGD that keeps only the k weights with the largest |w - w0| away from w0.

    Args:
        params: parameters or param groups; groups may set their own ``lr``.
        lr: learning rate (plain SGD: DropBack's score assumes no momentum).
        k: the global number of tracked weights across all parameters.
        freeze_after: steps after which the tracked set is frozen (None: never).
        init_decay: the authors' later option: every step w0 is multiplied by
            this factor (their tuned configs use 0.9), so untracked weights
            fade toward zero. It gives up the seeded scaffold: the tracked set
            is then no longer w0(seed) + deltas and cannot be exported to the
            wire (`tracked()` refuses). None (the paper's rule): w0 stays.

    The model must hold its seeded initial weights (or w0 + the deltas given
    to `set_tracked`) when training starts.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        k: int,
        freeze_after: int | None = None,
        init_decay: float | None = None,
    ) -> None:
        _check_lr(lr)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"Invalid tracked budget k: {k!r} (must be an int >= 1)")
        if freeze_after is not None and (
            isinstance(freeze_after, bool) or not isinstance(freeze_after, int) or freeze_after < 0
        ):
            raise ConfigError(f"Invalid freeze_after: {freeze_after!r} (must be None or an int >= 0)")
        super().__init__(params, {"lr": lr})
        for group in self.param_groups:
            _check_lr(group["lr"])
            for p in group["params"]:
                if p.is_sparse or p.dtype != torch.float32 or p.device.type != "cpu":
                    raise ConfigError(
                        f"DropBack needs dense float32 CPU parameters, got {p.dtype} on {p.device}"
                    )
        if init_decay is not None and not 0 < init_decay < 1:
            raise ConfigError(f"Invalid init_decay: {init_decay!r} (must be None or in (0, 1))")
        self.k = k
        self.freeze_after = freeze_after
        self.init_decay = init_decay
        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        # Parameters by position: the optimizer does not know their names.
        self._layout = Layout.of_shapes((str(i), tuple(p.shape)) for i, p in enumerate(self._params))
        self.numel = self._layout.numel
        self._flatten_parameters()
        self._idx = np.zeros(0, dtype=np.int64)  # global flat indices (unordered)
        self._base = np.zeros(0, dtype=np.float32)  # w0 at _idx
        self._threshold = 0.0
        self._steps = 0
        self._frozen = False

    def _flatten_parameters(self) -> None:
        self._flat_w = torch.empty(self.numel, dtype=torch.float32)
        self._flat_g = torch.zeros(self.numel, dtype=torch.float32)
        self._grad_views: list[Tensor] = []
        with torch.no_grad():
            for p, slot in zip(self._params, self._layout.tensors, strict=True):
                a, n = slot.offset, slot.numel
                self._flat_w[a : a + n].copy_(p.reshape(-1))
                p.data = self._flat_w[a : a + n].view_as(p)
                view = self._flat_g[a : a + n].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                self._grad_views.append(view)
        self._w = self._flat_w.numpy()
        self._g = self._flat_g.numpy()
        # Per-step scratch, reused so a step does not page-fault fresh N-sized arrays.
        self._step_buf = np.empty(self.numel, dtype=np.float32)
        self._score_buf = np.empty(self.numel, dtype=np.float32)
        self._mask_buf = np.empty(self.numel, dtype=bool)

    # ----- public state -------------------------------------------------------------
    @property
    def num_tracked(self) -> int:
        return int(self._idx.size)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def steps(self) -> int:
        return self._steps

    def state_bytes(self) -> int:
        """Bytes this optimizer keeps across steps (what a device budget pays for)."""
        return FIXED_STATE_BYTES + BYTES_PER_TRACKED * self.num_tracked

    @staticmethod
    def footprint(layout: Layout, activation_bytes: int) -> Footprint:
        """Peak bytes of one step on a model of this layout (measured against real steps in tests).

        Adds one copy of the largest tensor (autograd's gradient before it is
        accumulated into the flat buffer) and the batch's activations.
        """
        largest = max((t.numel for t in layout.tensors), default=0)
        fixed = FIXED_STATE_BYTES + STEP_BYTES_PER_WEIGHT * layout.numel + 4 * largest + activation_bytes
        return Footprint(fixed, STEP_BYTES_PER_TRACKED)

    def freeze(self) -> None:
        """Freeze the tracked set: from now on only tracked weights change."""
        self._frozen = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer in place (gradients stay views into it)."""
        self._flat_g.zero_()
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is not view:
                p.grad = view

    def tracked(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per parameter (in param-group order): sorted local flat indices and w - w0."""
        if self.init_decay is not None:
            raise ConfigError("with init_decay, w0 is no longer the seeded one: no sparse state to export")
        order = np.argsort(self._idx, kind="stable")
        idx = self._idx[order]
        delta = self._w[idx] - self._base[order]
        b = self._layout.bounds(idx)
        return [(local, delta[b[i] : b[i + 1]]) for i, local in enumerate(self._layout.split(idx))]

    @torch.no_grad()
    def set_tracked(self, per_param: list[tuple[Any, Any]]) -> None:
        """Start from a given tracked set (e.g. a published global model).

        `per_param` gives, for each parameter in param-group order, local flat
        indices and the initial values w0 at them; the parameters hold the
        tracked weights there and w0 elsewhere. When more than k entries are
        given, the k farthest from w0 stay and the rest are reset to w0.
        """
        if len(per_param) != len(self._params):
            raise ConfigError(f"expected {len(self._params)} entries, got {len(per_param)}")
        idx_parts, base_parts = [], []
        for i, ((idx, base), slot) in enumerate(zip(per_param, self._layout.tensors, strict=True)):
            idx = np.asarray(idx, dtype=np.int64).reshape(-1)
            base = np.asarray(base, dtype=np.float32).reshape(-1)
            if idx.size != base.size:
                raise ConfigError(f"parameter {i}: {idx.size} indices, {base.size} initial values")
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= slot.numel):
                raise ConfigError(f"parameter {i}: index out of range [0, {slot.numel})")
            idx_parts.append(idx + slot.offset)
            base_parts.append(base)
        gidx = np.concatenate(idx_parts)
        gbase = np.concatenate(base_parts)
        if np.unique(gidx).size != gidx.size:
            raise ConfigError("duplicate tracked indices")
        if gidx.size > self.k:
            order = np.argsort(-np.abs(self._w[gidx] - gbase), kind="stable")
            drop = order[self.k :]
            self._w[gidx[drop]] = gbase[drop]
            keep = np.sort(order[: self.k])
            gidx, gbase = gidx[keep], gbase[keep]
        self._idx, self._base = gidx, gbase.copy()
        self._threshold = 0.0

    # ----- the step -------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one DropBack step and return the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gather_foreign_grads()
        if not self._frozen and self.freeze_after is not None and self._steps >= self.freeze_after:
            self.freeze()
        if self._frozen:
            self._frozen_step()
        else:
            self._selection_step()
        if self.init_decay is not None:
            # Untracked weights sit at w0 and tracked ones are scored against it: decay both.
            kept = self._w[self._idx]
            self._w *= self.init_decay
            self._w[self._idx] = kept
            self._base *= self.init_decay
        self._steps += 1
        return loss

    def _gather_foreign_grads(self) -> None:
        """Copy gradients that autograd put outside the flat buffer (after set_to_none)."""
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is view:
                continue
            if p.grad is None:
                view.zero_()
            elif p.grad.is_sparse:
                raise ConfigError("DropBack does not support sparse gradients")
            else:
                view.copy_(p.grad)
            p.grad = view

    def _step_vector(self) -> np.ndarray:
        """-lr * g for every weight: the change plain SGD would make."""
        out = self._step_buf
        if len(self.param_groups) == 1:
            return np.multiply(self._g, -self.param_groups[0]["lr"], out=out)
        start = 0
        for group in self.param_groups:
            end = start + sum(p.numel() for p in group["params"])
            np.multiply(self._g[start:end], -group["lr"], out=out[start:end])
            start = end
        return out

    def _selection_step(self) -> None:
        step = self._step_vector()
        tracked, base = self._idx, self._base
        moved = self._w[tracked] + step[tracked]  # tracked weights after plain SGD
        score_tracked = np.abs(moved - base)
        score = np.abs(step, out=self._score_buf)  # |w - w0| of an untracked weight
        score[tracked] = 0.0  # tracked weights are scored separately
        threshold = self._threshold
        while True:
            entrants = np.flatnonzero(np.greater(score, threshold, out=self._mask_buf))
            n_pool = tracked.size + entrants.size
            pool_score = np.concatenate([score_tracked, score[entrants]])
            if n_pool < self.k:
                if threshold > 0.0:  # weights below the bar are needed to fill k
                    threshold = 0.0
                    continue
                kth = 0.0
                keep = np.ones(n_pool, dtype=bool)
                break
            kth = float(np.partition(pool_score, n_pool - self.k)[n_pool - self.k])
            if kth >= threshold:  # nothing outside the pool can beat the k-th score
                keep = pool_score >= kth
                surplus = int(keep.sum()) - self.k
                if surplus > 0:  # ties at the k-th score: keep exactly k
                    keep[np.flatnonzero(pool_score == kth)[:surplus]] = False
                break
            threshold = kth  # tracked scores fell below the bar: rescan once, lower
        # A bar a little under the k-th score lets most steps avoid the rescan.
        self._threshold = kth * THRESHOLD_MARGIN
        keep_tracked, keep_entrants = keep[: tracked.size], keep[tracked.size :]
        new_entrants = entrants[keep_entrants]
        # Kept weights take the SGD step; tracked weights that drop return to w0
        # exactly; untracked weights sit at w0, which is what entrants record.
        self._w[tracked] = np.where(keep_tracked, moved, base)
        entrant_base = self._w[new_entrants]
        self._w[new_entrants] += step[new_entrants]
        self._idx = np.concatenate([tracked[keep_tracked], new_entrants])
        self._base = np.concatenate([base[keep_tracked], entrant_base])

    def _frozen_step(self) -> None:
        idx = self._idx
        if len(self.param_groups) == 1:
            self._w[idx] -= self.param_groups[0]["lr"] * self._g[idx]
        else:
            self._w[idx] += self._step_vector()[idx]

    # ----- persistence -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-parameter state: tracked local indices and their w0 (O(k), never dense)."""
        order = np.argsort(self._idx, kind="stable")
        idx, base = self._idx[order], self._base[order]
        bounds = self._layout.bounds(idx)
        for i, (p, local) in enumerate(zip(self._params, self._layout.split(idx), strict=True)):
            a, b = bounds[i], bounds[i + 1]
            self.state[p] = {
                "indices": torch.from_numpy(local),
                "initial": torch.from_numpy(base[a:b].copy()),
            }
        sd = super().state_dict()
        sd["dropback"] = {
            "k": self.k,
            "freeze_after": self.freeze_after,
            "steps": self._steps,
            "threshold": self._threshold,
            "frozen": self._frozen,
            "init_decay": self.init_decay,
        }
        self.state.clear()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore tracked set, counters and learning rates from `state_dict()`."""
        sd = dict(state_dict)
        extra = sd.pop("dropback")
        super().load_state_dict(sd)
        per_param = []
        for p in self._params:
            st = self.state.get(p, {})
            per_param.append(
                (
                    st.get("indices", torch.zeros(0, dtype=torch.int64)).numpy(),
                    st.get("initial", torch.zeros(0)).numpy(),
                )
            )
        self.state.clear()
        self.k, self.freeze_after = extra["k"], extra["freeze_after"]
        self.set_tracked(per_param)
        self._steps, self._threshold = extra["steps"], extra["threshold"]
        self._frozen = extra["frozen"]
        self.init_decay = extra.get("init_decay")


def _check_lr(lr: object) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr < float("inf"):
        raise ConfigError(f"Invalid learning rate: {lr!r} (must be finite and > 0)")
