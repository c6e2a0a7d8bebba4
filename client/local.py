"""What a device does in a round, free of Flower: data, budget, DropBack training.

The ClientApp (client/app.py) only unpacks messages and calls these.
"""

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from dropfleet.client.profiles import DeviceProfile, budget_to_k
from dropfleet.common.codec import encode
from dropfleet.common.data import (
    Split,
    fashion_mnist_labels,
    load_device_data,
    load_fashion_mnist,
    partition_indices,
)
from dropfleet.common.dropback import DropBack
from dropfleet.common.errors import BudgetError
from dropfleet.common.layer_init import seeded_model
from dropfleet.common.sparse import (
    SparseModel,
    initial_at_tracked,
    load_deltas_,
    num_weights,
    sparse_from_optimizer,
)
from dropfleet.common.streaming import StreamingDropBack
from dropfleet.common.topk import Dense, sparsify_with_feedback
from dropfleet.common.train import EvalResult, evaluate, recalibrate_batch_norm, train_epochs
from dropfleet.common.uplink import Residual, encode_change
from dropfleet.fleet.config import RunConfig

VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class LocalUpdate:
    model: SparseModel
    num_examples: int
    train_loss: float
    k: int
    state_bytes: int
    budget_bytes: int


@cache
def local_data(
    config: RunConfig, partition_id: int, num_partitions: int, data_dir: str | None = None
) -> tuple[Split, Split]:
    """This node's examples, split into local train and validation.

    With `data_dir` (node config `data-dir`), the device's own data set
    (`common.data.load_device_data`); otherwise its partition of Fashion-MNIST.
    """
    if data_dir:
        own = load_device_data(data_dir)
        idx = np.random.default_rng(config.seed).permutation(len(own))
    else:
        labels = fashion_mnist_labels("train", config.fashion_mnist_dir or None)
        idx = partition_indices(
            labels, num_partitions, partition_id, config.partitioner, config.alpha, config.seed
        )
        # Only this partition's images, in idx order.
        own = load_fashion_mnist("train", config.fashion_mnist_dir or None, indices=idx)
        idx = np.arange(len(idx))
    if config.train_subset:
        idx = idx[: config.train_subset]
    n_val = max(1, int(len(idx) * VALIDATION_FRACTION))
    return own.subset(idx[n_val:]), own.subset(idx[:n_val])


def client_k(profile: DeviceProfile, config: RunConfig, num_weights: int) -> int:
    """k for this device (raises `BudgetError` when the budget is too small)."""
    return budget_to_k(profile.state_budget_bytes, num_weights, config.min_k)


def is_available(profile: DeviceProfile, config: RunConfig, server_round: int, partition_id: int) -> bool:
    """Simulated availability: a reproducible coin flip per (seed, round, node)."""
    rng = np.random.default_rng([config.seed, server_round, partition_id])
    return bool(rng.random() < profile.availability)


def train_sparse(
    global_model: SparseModel,
    data: Split,
    profile: DeviceProfile,
    config: RunConfig,
    server_round: int,
    streaming: bool = False,
) -> LocalUpdate:
    """Start from the published global set (trimmed to this device's k) and run DropBack.

    With `streaming`, the dense weights are never resident: each layer is
    regenerated from the seed and the tracked set when it runs (the same
    training; slower; see `StreamingDropBack` on ties).
    """
    k = client_k(profile, config, num_weights(global_model.model_id))
    steps_per_epoch = -(-len(data) // config.batch_size)
    freeze = config.freeze_epochs * steps_per_epoch if config.freeze_epochs else None
    seed, lr = config.training_seed(server_round), config.learning_rate_at(server_round)
    if streaming:
        trainer = StreamingDropBack(global_model.model_id, global_model.seed, k, lr, freeze)
        trainer.load(global_model)
        loss = train_epochs(trainer, trainer, data, config.local_epochs, config.batch_size, seed=seed)
        update, state_bytes = trainer.to_sparse(), trainer.state_bytes()
    else:
        model = seeded_model(global_model.model_id, global_model.seed, global_model.init_scheme)
        load_deltas_(model, global_model)
        opt = DropBack(model.parameters(), lr=lr, k=k, freeze_after=freeze)
        opt.set_tracked(initial_at_tracked(global_model))
        loss = train_epochs(model, opt, data, config.local_epochs, config.batch_size, seed=seed)
        update = sparse_from_optimizer(model, opt, global_model.seed, global_model.model_id)
        state_bytes = opt.state_bytes()
    if state_bytes > profile.state_budget_bytes:  # guarded by construction; never trust it blindly
        raise BudgetError(f"state grew to {state_bytes} bytes > budget {profile.state_budget_bytes}")
    return LocalUpdate(
        model=update,
        num_examples=len(data),
        train_loss=loss,
        k=k,
        state_bytes=state_bytes,
        budget_bytes=profile.state_budget_bytes,
    )


def uplink_payload(
    update: SparseModel, sent: SparseModel, config: RunConfig, server_round: int, residual: Residual
) -> tuple[bytes, Residual]:
    """The reply's wire bytes: deltas, or changes against the global `sent` this round (with feedback)."""
    if config.uplink_coding == "change":
        return encode_change(update, sent, server_round, config.uplink_values, residual)
    return encode(update, config.uplink_values), residual


def train_dense(
    state: dict[str, torch.Tensor], data: Split, config: RunConfig, server_round: int
) -> tuple[dict[str, torch.Tensor], float]:
    """The dense FedAvg baseline: plain SGD from the global dense weights."""
    model = seeded_model(config.model_id, config.seed)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate_at(server_round))
    loss = train_epochs(
        model, opt, data, config.local_epochs, config.batch_size, seed=config.training_seed(server_round)
    )
    return model.state_dict(), loss


def train_topk(
    weights: Dense, residual: Dense, data: Split, profile: DeviceProfile, config: RunConfig, server_round: int
) -> tuple[bytes, Dense, float, int]:
    """The sparsified-FedAvg baseline: SGD from the dense global model, then send the top-k of
    the update plus residual. Returns (wire bytes, new residual, loss, k)."""
    model = seeded_model(config.model_id, config.seed)
    model.load_state_dict({n: torch.from_numpy(w) for n, w in weights.items()})
    k = client_k(profile, config, sum(w.size for w in weights.values()))
    opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate_at(server_round))
    loss = train_epochs(
        model, opt, data, config.local_epochs, config.batch_size, seed=config.training_seed(server_round)
    )
    update = {n: p.detach().numpy() - weights[n] for n, p in model.named_parameters()}
    payload, _, residual = sparsify_with_feedback(
        update, residual, k, config.model_id, config.seed, config.value_precision
    )
    return payload, residual, loss, k


def evaluate_sparse(global_model: SparseModel, data: Split, calibration: Split) -> EvalResult:
    """Evaluate the global model; batch-norm statistics come from this node's training data."""
    from dropfleet.common.sparse import materialize

    model = materialize(global_model)
    recalibrate_batch_norm(model, calibration)
    return evaluate(model, data)
