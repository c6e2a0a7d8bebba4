"""DropBack (Golub, Lemieux & Lis, arXiv 1806.06949) as a PyTorch optimizer.

Plain SGD, but only k weights of the whole model (one global budget across all
parameters and groups) may leave their initial value w0. After each SGD update
every weight is scored by |w - w0| (the accumulated gradient times lr); the k
highest stay tracked and every other weight is put back to w0, not to zero.

The shape follows torch/optim/sgd.py: every hyperparameter (lr, k,
freeze_after, init_decay) lives in `defaults` and each param group, validated
at construction; the optimization state lives in `self.state`; `step()` is glue
around one functional core, `dropback_select`, which holds the maths; and
`state_dict()` / `load_state_dict()` are torch's (loading only keeps the
positions integer and checks what it loaded).

The optimizer never holds a dense w0. Untracked weights already sit at w0 in
the dense working tensors, so the state of a parameter p is where its tracked
weights are and w0 there, nothing dense: ``state[p]["positions"]`` (int64,
sorted: flat positions in the optimizer's flat buffer, i.e. p's offset plus
the local flat index, as `SparseModel.flat_positions` counts them; `tracked()`
gives local indices) and ``state[p]["initial"]`` (float32), 12 bytes a tracked
weight over the model. Positions rather than local indices because the step
selects over the flat buffer: the state is then the step's own index, with no
per-step conversion and no second copy. Keeping w0 (not the delta) makes a
dropped weight return to w0 bit for bit. The top-k is one selection over all
parameters, so its counters are optimizer-wide and, as torch's LBFGS does with
its own, are kept in the first parameter's state: ``step`` (steps taken),
``threshold`` (the running entry bar) and ``frozen``. State entries are
replaced, never written in place, so a `state_dict()` (torch's holds
references) stays what it was when taken.

Selection is exact top-k, made cheap by a running threshold t (the k-th score
of the previous step): an untracked weight can only enter the tracked set if
its one-step score lr*|g| exceeds t, so one compare over N weights finds the
few candidates, and the top-k is taken over the k tracked weights plus those
candidates. If the k-th score of that pool falls below t, weights outside the
pool could qualify, so the pool is rebuilt once with the lower threshold,
which makes the result exact.

To make a step a handful of vectorized passes instead of a loop over tensors,
the optimizer moves its parameters (and their gradients) into one flat buffer
each and leaves every parameter a view into it; `zero_grad()` zeroes the flat
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

from dropfleet.common.device.budget import (
    DENSE_STATE_BYTES_PER_TRACKED,
    FIXED_STATE_BYTES,
    Footprint,
    dense_footprint,
)
from dropfleet.common.device.dropback_core import Scratch, dropback_select
from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.model.layout import Layout, model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor

# What the optimizer keeps between steps (DENSE_STATE_BYTES_PER_TRACKED, FIXED_STATE_BYTES) and
# its step's peak are stated in budget.py, which plans without torch; the lean trainer keeps the same.
# Hyperparameters that belong to the whole optimizer, not to a param group: k is one
# budget over all parameters, so the freeze and the w0 decay apply to all of them too.
GLOBAL_HYPERPARAMETERS = ("k", "freeze_after", "init_decay")
# Optimizer-wide counters, kept in the first parameter's state (as torch's LBFGS does).
SHARED_STATE = ("step", "threshold", "frozen")


class DropBack(Optimizer):
    """SGD that keeps only the k weights with the largest |w - w0| away from w0.

    Args:
        params: parameters or param groups; groups may set their own ``lr``
            (``k``, ``freeze_after`` and ``init_decay`` are one setting for the
            whole optimizer: a group that sets another value is refused).
        lr: learning rate (plain SGD: DropBack's score assumes no momentum).
        k: the global number of tracked weights across all parameters.
        freeze_after: steps after which the tracked set is frozen (None: never).
        init_decay: the authors' later option: every step w0 is multiplied by
            this factor (their tuned configs use 0.9), so untracked weights
            fade toward zero. It gives up the seeded scaffold: the tracked set
            is then no longer w0(seed) + deltas and cannot be exported to the
            wire (`tracked()` refuses). None (the paper's rule): w0 stays.

    Invalid values raise `ConfigError` (a `ValueError`) naming the value. The
    model must hold its seeded initial weights (or w0 + the deltas given to
    `set_tracked`) when training starts.
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
        if init_decay is not None and (
            isinstance(init_decay, bool) or not isinstance(init_decay, (int, float)) or not 0 < init_decay < 1
        ):
            raise ConfigError(f"Invalid init_decay: {init_decay!r} (must be None or in (0, 1))")
        defaults = {"lr": lr, "k": k, "freeze_after": freeze_after, "init_decay": init_decay}
        super().__init__(params, defaults)  # validates each group in add_param_group
        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        # Parameters by position: the optimizer does not know their names.
        self._layout = Layout.of_shapes((str(i), tuple(p.shape)) for i, p in enumerate(self._params))
        self.numel = self._layout.numel
        self._flatten_parameters()
        self._scratch = Scratch.empty(self.numel)
        ends = np.cumsum([sum(p.numel() for p in g["params"]) for g in self.param_groups])
        self._group_ends = [int(e) for e in ends]  # where each group's span of the flat buffer ends
        # The state as `_store` last laid it out, flat (the same memory): see `_flat_tracked`.
        self._flat: tuple[np.ndarray, np.ndarray, list[tuple[Tensor, Tensor]]] | None = None
        empty = np.zeros(0, dtype=np.int64)
        self._store(empty, np.zeros(0, dtype=np.float32), {"step": 0, "threshold": 0.0, "frozen": False})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus this optimizer's checks; only while constructing (the flat buffers are fixed)."""
        if hasattr(self, "_layout"):
            raise ConfigError(
                "DropBack flattens its parameters when built: pass every group to the constructor"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_lr(group["lr"])
        for name in GLOBAL_HYPERPARAMETERS:
            if group[name] != self.defaults[name]:
                raise ConfigError(
                    f"{name} is one setting for the whole optimizer (k is a global budget): "
                    f"a param group cannot set {name}={group[name]!r}"
                )
        for p in group["params"]:
            if p.is_sparse or p.dtype != torch.float32 or p.device.type != "cpu":
                raise ConfigError(f"DropBack needs dense float32 CPU parameters, got {p.dtype} on {p.device}")

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

    # ----- hyperparameters and state ---------------------------------------------------
    @property
    def k(self) -> int:
        return self.param_groups[0]["k"]

    @property
    def freeze_after(self) -> int | None:
        return self.param_groups[0]["freeze_after"]

    @property
    def init_decay(self) -> float | None:
        return self.param_groups[0]["init_decay"]

    @property
    def num_tracked(self) -> int:
        return sum(int(self.state[p]["positions"].numel()) for p in self._params)

    @property
    def frozen(self) -> bool:
        return bool(self._shared["frozen"])

    @property
    def steps(self) -> int:
        return int(self._shared["step"])

    @property
    def _shared(self) -> dict[str, Any]:
        return self.state[self._params[0]]

    def state_bytes(self) -> int:
        """Bytes this optimizer keeps across steps (what a device budget pays for)."""
        return FIXED_STATE_BYTES + DENSE_STATE_BYTES_PER_TRACKED * self.num_tracked

    @staticmethod
    def footprint(layout: Layout, activation_bytes: int) -> Footprint:
        """Peak bytes of one step on a model of this layout (`budget.dense_footprint`; measured
        against real steps in tests/common/device/test_footprint.py)."""
        return dense_footprint(layout, activation_bytes)

    def freeze(self) -> None:
        """Freeze the tracked set: from now on only tracked weights change."""
        self._set_shared(frozen=True)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Reset the gradients before a backward pass.

        The default (unlike torch's) zeroes the flat gradient buffer in place and
        leaves every ``p.grad`` a zero view into it, so autograd accumulates
        there and a step holds one dense gradient. ``set_to_none=True`` sets
        ``p.grad`` to None as torch does; autograd then allocates a fresh
        gradient per parameter, which `step` copies into the flat buffer.
        """
        if set_to_none:
            for p in self._params:
                p.grad = None
            return
        self._flat_g.zero_()
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is not view:
                p.grad = view

    def tracked(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per parameter (in param-group order): sorted local flat indices and w - w0."""
        if self.init_decay is not None:
            raise ConfigError("with init_decay, w0 is no longer the seeded one: no sparse state to export")
        out = []
        for p, slot in zip(self._params, self._layout.tensors, strict=True):
            positions = self.state[p]["positions"].numpy()
            out.append((positions - slot.offset, self._w[positions] - self.state[p]["initial"].numpy()))
        return out

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
            # Farthest from w0 first; equal distances in the order given.
            order = np.argsort(-np.abs(self._w[gidx] - gbase), kind="stable")
            drop = order[self.k :]
            self._w[gidx[drop]] = gbase[drop]
            keep = order[: self.k]
            gidx, gbase = gidx[keep], gbase[keep]
        order = np.argsort(gidx, kind="stable")
        counters = {key: self._shared[key] for key in SHARED_STATE}
        self._store(gidx[order], gbase[order], {**counters, "threshold": 0.0})

    # ----- the step -------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one DropBack step and return the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gather_foreign_grads()
        first, group = self._params[0], self.param_groups[0]
        shared, freeze_after = self.state[first], group["freeze_after"]
        frozen = shared["frozen"] or (freeze_after is not None and shared["step"] >= freeze_after)
        tracked, initial = self._flat_tracked()
        result = dropback_select(
            self._w,
            self._g,
            tracked,
            initial,
            lr=[(end, g["lr"]) for end, g in zip(self._group_ends, self.param_groups, strict=True)],
            k=group["k"],
            threshold=shared["threshold"],
            frozen=frozen,
            init_decay=group["init_decay"],
            scratch=self._scratch,
        )
        counters = {"step": shared["step"] + 1, "threshold": result.threshold, "frozen": frozen}
        if result.tracked is tracked and result.initial is initial:
            self.state[first] = {**shared, **counters}  # the tracked set is as it was (e.g. frozen)
        else:
            self._store(result.tracked, result.initial, counters)
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

    def _flat_tracked(self) -> tuple[np.ndarray, np.ndarray]:
        """The tracked set over all parameters, sorted: their state end to end (tensors lie in order).

        `_store` lays every parameter's state out as views into one positions
        and one w0 array, so while `self.state` still holds those views they
        are the answer as they stand; state put there otherwise (by
        `load_state_dict`) is concatenated.
        """
        state, flat = self.state, self._flat
        if flat is not None:
            for p, (pos, w0) in zip(self._params, flat[2], strict=True):
                st = state[p]
                if st.get("positions") is not pos or st.get("initial") is not w0:
                    break
            else:
                return flat[0], flat[1]
        tracked = np.concatenate([state[p]["positions"].numpy() for p in self._params])
        initial = np.concatenate([state[p]["initial"].numpy() for p in self._params])
        return tracked, initial

    def _store(self, tracked: np.ndarray, initial: np.ndarray, counters: dict[str, Any]) -> None:
        """Split a sorted tracked set (global positions) into per-parameter state: views, no copies.

        `counters` are the optimizer-wide ones (`SHARED_STATE`), all of them.
        """
        sizes = np.diff(self._layout.bounds(tracked)).tolist()
        views = list(
            zip(
                torch.split_with_sizes(torch.from_numpy(tracked), sizes),
                torch.split_with_sizes(torch.from_numpy(initial), sizes),
                strict=True,
            )
        )
        state = self.state
        for p, (pos, w0) in zip(self._params, views, strict=True):
            state[p] = {"positions": pos, "initial": w0}
        state[self._params[0]].update(counters)
        self._flat = (tracked, initial, views)

    def _set_shared(self, **shared: Any) -> None:
        self.state[self._params[0]] = {**self._shared, **shared}

    # ----- persistence -----------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (hyperparameters from the groups, state per parameter), then checked.

        torch casts every tensor in a floating-point parameter's state to the
        parameter's dtype, which would make the int64 positions float32
        (inexact past 2**24); they are taken from `state_dict` as they are.
        """
        saved = state_dict.get("state", {})
        positions = {
            pid: st["positions"] for pid, st in saved.items() if isinstance(st, dict) and "positions" in st
        }
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for pid, p in zip(saved_ids, self._params, strict=True):
            if pid in positions:
                self.state[p] = {**self.state[p], "positions": positions[pid]}
        self._adopt_loaded_state()

    def _adopt_loaded_state(self) -> None:
        """Check what torch loaded and lay it out as `_store` does, so steps read it in place."""
        for name in GLOBAL_HYPERPARAMETERS:
            if len({repr(g[name]) for g in self.param_groups}) != 1:
                raise ConfigError(
                    f"loaded param groups disagree on {name}, one setting for the whole optimizer"
                )
        shared = self._shared
        missing = [key for key in SHARED_STATE if key not in shared]
        if missing:
            raise ConfigError(f"loaded state lacks the optimizer-wide {', '.join(missing)}")
        step, threshold, frozen = shared["step"], shared["threshold"], shared["frozen"]
        if (
            isinstance(step, bool)
            or not isinstance(step, int)
            or step < 0
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold < float("inf")
            or not isinstance(frozen, bool)
        ):
            raise ConfigError(
                f"loaded counters out of range: step={step!r}, threshold={threshold!r}, frozen={frozen!r}"
            )
        parts, total = [], 0
        for i, (p, slot) in enumerate(zip(self._params, self._layout.tensors, strict=True)):
            st = self.state[p]
            pos = torch.as_tensor(st.get("positions", torch.zeros(0, dtype=torch.int64)))
            w0 = torch.as_tensor(st.get("initial", torch.zeros(0)))
            if pos.dtype.is_floating_point or pos.ndim != 1 or w0.shape != pos.shape:
                raise ConfigError(f"parameter {i}: loaded state is not 1-D integer positions with w0 at each")
            flat = pos.to(torch.int64).numpy()
            if flat.size and (
                int(flat[0]) < slot.offset or int(flat[-1]) >= slot.end or not bool(np.all(np.diff(flat) > 0))
            ):
                raise ConfigError(
                    f"parameter {i}: loaded positions are not sorted, unique "
                    f"and in [{slot.offset}, {slot.end})"
                )
            parts.append((flat, w0.to(torch.float32).numpy()))
            total += flat.size
        if total > self.k:
            raise ConfigError(f"loaded state tracks {total} weights, more than k={self.k}")
        tracked = np.concatenate([pos for pos, _ in parts])
        initial = np.concatenate([w0 for _, w0 in parts])
        self._store(tracked, initial, {"step": step, "threshold": float(threshold), "frozen": frozen})


def _check_lr(lr: object) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr < float("inf"):
        raise ConfigError(f"Invalid learning rate: {lr!r} (must be finite and > 0)")


def sparse_from_optimizer(
    model: torch.nn.Module, optimizer: DropBack, seed: int, model_id: str
) -> SparseModel:
    """The optimizer's tracked set as a `SparseModel` (deltas w - w0)."""
    names = [n for n, _ in model.named_parameters()]
    if [id(p) for g in optimizer.param_groups for p in g["params"]] != [id(p) for p in model.parameters()]:
        raise WireFormatError("optimizer must hold exactly model.parameters(), in order")
    shapes = model_layout(model_id).shapes
    tensors = tuple(
        SparseTensor(name, shapes[name], idx, delta)
        for name, (idx, delta) in zip(names, optimizer.tracked(), strict=True)
    )
    return SparseModel(seed=seed, model_id=model_id, tensors=tensors)
