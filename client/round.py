"""What a device does in a round whichever runtime trains it (torch or lean): free of torch and Flower.

The plan its budget allows, whether it is available this round, what it
reports, and how its update goes on the wire. `client/local.py` (torch) and
`client/lean.py` (NumPy alone) train; the ClientApp picks one per node.
"""

from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

import numpy as np

from dropfleet.common.device.budget import available_backend
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import encode
from dropfleet.common.wire.uplink import Residual, encode_change
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import DeviceProfile, TrainingPlan, plan_training

VALIDATION_FRACTION = 0.1


class Examples(Protocol):
    """A device's examples, whichever runtime holds them (torch's `Split`, lean's `Examples`)."""

    def __len__(self) -> int: ...

    def subset(self, indices: np.ndarray) -> Self: ...


E = TypeVar("E", bound=Examples)


def train_and_validation(own: E, idx: np.ndarray, config: RunConfig) -> tuple[E, E]:
    """The device's examples at `idx` (in that order), capped at `train-subset`, split into local
    training and the validation held out for federated evaluation (`VALIDATION_FRACTION`)."""
    if config.train_subset:
        idx = idx[: config.train_subset]
    n_val = max(1, int(len(idx) * VALIDATION_FRACTION))
    return own.subset(idx[n_val:]), own.subset(idx[:n_val])


@dataclass(frozen=True)
class LocalUpdate:
    model: SparseModel
    num_examples: int
    train_loss: float
    k: int
    state_bytes: int  # kept between steps
    budget_bytes: int
    trainer: str  # the plan's mode: dense, streaming or streaming-blocks
    peak_bytes: int | None  # a first step's, measured once per plan in this process (None: profiler busy)


def client_plan(profile: DeviceProfile, config: RunConfig, streaming_only: bool = False) -> TrainingPlan:
    """This device's trainer and k (raises `BudgetError` when the budget holds no training step),
    for the backend its streaming trainer will find here (numba's kernels or NumPy's)."""
    return plan_training(
        profile.state_budget_bytes,
        config.model_id,
        config.batch_size,
        config.min_k,
        streaming_only,
        backend=available_backend(),
    )


def round_schedule(
    global_model: SparseModel,
    num_examples: int,
    profile: DeviceProfile,
    config: RunConfig,
    server_round: int,
    streaming_only: bool = False,
) -> tuple[TrainingPlan, int | None, int, float]:
    """A DropBack round's plan, freeze step, batch-order seed and learning rate, whichever runtime
    trains it; refuses a global model of another model id."""
    if global_model.model_id != config.model_id:
        raise ConfigError(
            f"the global model is {global_model.model_id!r}, the run trains {config.model_id!r}"
        )
    plan = client_plan(profile, config, streaming_only)
    steps_per_epoch = -(-num_examples // config.batch_size)
    freeze = config.freeze_epochs * steps_per_epoch if config.freeze_epochs else None
    return plan, freeze, config.training_seed(server_round), config.learning_rate_at(server_round)


def is_available(profile: DeviceProfile, config: RunConfig, server_round: int, partition_id: int) -> bool:
    """Simulated availability: a reproducible coin flip per (seed, round, node)."""
    rng = np.random.default_rng([config.seed, server_round, partition_id])
    return bool(rng.random() < profile.availability)


def uplink_payload(
    update: SparseModel, sent: SparseModel, config: RunConfig, server_round: int, residual: Residual
) -> tuple[bytes, Residual]:
    """The reply's wire bytes: deltas, or changes against the global `sent` this round (with feedback)."""
    if config.uplink_coding == "change":
        return encode_change(update, sent, server_round, config.uplink_values, residual)
    return encode(update, config.uplink_values), residual
