"""The strategies by run-config name, read by the ServerApp and the ClientApp alike.

One run's `strategy` (fleet/config.py) picks one `StrategySpec` here, on both
sides of the wire: the ServerApp builds `spec.server` (server/strategies/), and
every ClientApp trains with `spec.trainer` (client/app.py) and evaluates with
`spec.evaluator`. The record keys say which ArrayRecords an instruction of the
strategy may carry, so a device refuses any other instead of guessing the
strategy from what arrived.

The classes and handlers are named by import path, not imported: a ClientApp
never loads the server's strategies, nor the ServerApp the client's trainers.

Adding a strategy: its name in fleet/config.py's STRATEGIES, a `StrategySpec`
here, a module in server/strategies/ and, if its devices train differently, a
handler in client/app.py.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib import import_module
from typing import Any

from dropfleet.fleet.config import STRATEGIES
from dropfleet.fleet.records import (
    DENSE_RECORD,
    GLOBAL_DELTA_RECORD,
    SPARSE_RECORD,
    TOPK_MODEL_RECORD,
    TOPK_RECORD,
)


@dataclass(frozen=True)
class StrategySpec:
    """What one strategy is on each side.

    `server`: the ServerApp's strategy class, "module:Class". `trainer` and
    `evaluator`: the ClientApp's handlers, "module:function" (`evaluator` None:
    the server evaluates centrally only and sends no evaluation instructions).
    `records`: the ArrayRecord keys an instruction may carry, the usual one first.
    `runtimes`: the node runtimes that train it (client/app.py: torch, or lean on a board
    without torch).
    """

    name: str
    server: str
    trainer: str
    evaluator: str | None
    records: tuple[str, ...]
    runtimes: tuple[str, ...] = ("torch",)

    @property
    def record(self) -> str:
        """The ArrayRecord key of an instruction that carries the global model as is."""
        return self.records[0]

    def server_class(self) -> type:
        return _load(self.server)

    def train_handler(self) -> Callable[..., Any]:
        return _load(self.trainer)

    def evaluate_handler(self) -> Callable[..., Any] | None:
        return _load(self.evaluator) if self.evaluator else None


_DROPBACK = StrategySpec(
    name="dropback",
    server="dropfleet.server.strategies.dropback:SparseDropBack",
    trainer="dropfleet.client.app:dropback_trainer",
    evaluator="dropfleet.client.app:dropback_evaluator",
    # The whole tracked set, or (downlink-coding "delta") the change since the version a device holds.
    records=(SPARSE_RECORD, GLOBAL_DELTA_RECORD),
    runtimes=("torch", "lean"),
)

SPECS: dict[str, StrategySpec] = {
    # The paper's SparseDropBack with fleet/config.py's winning recipe: the same code, other defaults.
    "dropback-momentum": replace(_DROPBACK, name="dropback-momentum"),
    "dropback": _DROPBACK,
    "fedavg": StrategySpec(
        name="fedavg",
        server="dropfleet.server.strategies.fedavg:DenseFedAvg",
        trainer="dropfleet.client.baselines:fedavg_trainer",
        evaluator="dropfleet.client.baselines:fedavg_evaluator",
        records=(DENSE_RECORD,),
    ),
    "topk-ef": StrategySpec(
        name="topk-ef",
        server="dropfleet.server.strategies.topk_ef:TopKFedAvg",
        trainer="dropfleet.client.baselines:topk_trainer",
        evaluator=None,  # a baseline for the byte race: the server evaluates the global model centrally
        # The update to the current version (after those a device missed), or the whole dense model.
        records=(TOPK_RECORD, TOPK_MODEL_RECORD),
    ),
}
assert tuple(SPECS) == STRATEGIES, "fleet/config.py names the strategies this registry describes"


def spec(strategy: str) -> StrategySpec:
    """The spec of a run's `strategy` (RunConfig has checked the name)."""
    return SPECS[strategy]


@cache
def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)
