"""The ServerApp's strategies: one module each over `base.FleetStrategy`.

Which class a run builds is fleet/strategies.py's `StrategySpec.server` for the
run's `strategy` (the registry the ClientApp reads too). To follow one round,
open base.py (the loop and screening), then the strategy's module
(dropback.py, topk_ef.py, fedavg.py) for the steps it overrides.
"""

from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.strategies import spec
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluated, Evaluation, FleetStrategy, Screened, Trained
from dropfleet.server.strategies.dropback import SparseDropBack
from dropfleet.server.strategies.fedavg import DenseFedAvg
from dropfleet.server.strategies.topk_ef import TopKFedAvg


def build_strategy(
    config: RunConfig, recorder: RoundRecorder, evaluation: Evaluation, checkpoint: Checkpoint | None = None
) -> FleetStrategy:
    """The run's strategy; only DropBack resumes from a checkpoint (fleet/config.py checks that)."""
    strategy: type[FleetStrategy] = spec(config.strategy).server_class()
    if checkpoint is not None:
        return strategy(config, recorder, evaluation, checkpoint)
    return strategy(config, recorder, evaluation)


__all__ = [
    "DenseFedAvg",
    "Evaluated",
    "Evaluation",
    "FleetStrategy",
    "Screened",
    "SparseDropBack",
    "TopKFedAvg",
    "Trained",
    "build_strategy",
]
