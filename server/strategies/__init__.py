"""Strategies by run-config name (`strategy = ...`), one per module over `base.FleetStrategy`."""

from dropfleet.fleet.config import STRATEGIES, RunConfig
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, FleetStrategy
from dropfleet.server.strategies.dropback import SparseDropBack
from dropfleet.server.strategies.fedavg import DenseFedAvg
from dropfleet.server.strategies.topk_ef import TopKFedAvg

REGISTRY: dict[str, type[FleetStrategy]] = {
    "dropback-momentum": SparseDropBack,  # the paper's strategy with fleet/config.py's winning recipe
    "dropback": SparseDropBack,
    "fedavg": DenseFedAvg,
    "topk-ef": TopKFedAvg,
}
assert tuple(REGISTRY) == STRATEGIES, "fleet/config.py names the strategies the registry builds"


def build_strategy(
    config: RunConfig, recorder: RoundRecorder, evaluation: Evaluation, checkpoint: Checkpoint | None = None
) -> FleetStrategy:
    """The run's strategy; only DropBack resumes from a checkpoint (fleet/config.py checks that)."""
    if checkpoint is not None:
        return SparseDropBack(config, recorder, evaluation, checkpoint)
    return REGISTRY[config.strategy](config, recorder, evaluation)


__all__ = [
    "REGISTRY",
    "DenseFedAvg",
    "Evaluation",
    "FleetStrategy",
    "SparseDropBack",
    "TopKFedAvg",
    "build_strategy",
]
