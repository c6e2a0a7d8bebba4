"""What a device does in a round, free of Flower: data, budget, DropBack training.

The ClientApp (client/app.py) only unpacks messages and calls these.
"""

import logging
from functools import cache

import numpy as np
import torch

from dropfleet.client.round import LocalUpdate, client_plan, round_schedule, train_and_validation
from dropfleet.common.device.data import Split, load_device_data, load_fashion_mnist, partition_indices
from dropfleet.common.device.data_files import fashion_mnist_labels
from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.device.footprint import held_bytes
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.device.train import (
    EvalResult,
    PeakProbe,
    evaluate,
    recalibrate_batch_norm,
    train_epochs,
)
from dropfleet.common.model.sparse import SparseModel, initial_at_tracked
from dropfleet.common.model.torch_model import load_deltas_, seeded_model
from dropfleet.common.wire.topk import Dense, sparsify_with_feedback
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import DeviceProfile

log = logging.getLogger(__name__)


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
    return train_and_validation(own, idx, config)


def train_sparse(
    global_model: SparseModel,
    data: Split,
    profile: DeviceProfile,
    config: RunConfig,
    server_round: int,
    streaming_only: bool = False,
) -> LocalUpdate:
    """Start from the published global set (trimmed to this device's k) and run DropBack.

    The trainer is the budget's plan (`client_plan`): DropBack on dense weights
    when its step fits, else streaming, where the dense weights are never
    resident: each layer (or row block) is regenerated from the seed and the
    tracked set when it runs (the same training; slower; see
    `StreamingDropBack` on ties). The first step's peak is measured and
    reported (logged when it exceeds the budget): once per plan, first batch
    and starting set in this process (`PeakProbe`'s key), then reused.
    """
    plan, freeze, seed, lr = round_schedule(
        global_model, len(data), profile, config, server_round, streaming_only
    )
    # What the first step's memory depends on; rounds that repeat it reuse its measured peak.
    step_key = (
        plan.mode, plan.k, plan.block_weights, global_model.model_id, global_model.init_scheme,
        global_model.num_tracked, min(config.batch_size, len(data)),
    )  # fmt: skip
    if plan.streaming:
        trainer = StreamingDropBack(
            global_model.model_id, global_model.seed, plan.k, lr, freeze, block_weights=plan.block_weights
        )
        trainer.load(global_model)
        probe = PeakProbe(lambda: held_bytes(trainer), step_key)
        loss = train_epochs(trainer, trainer, data, config.local_epochs, config.batch_size, seed, probe)
        update, state_bytes = trainer.to_sparse(), trainer.state_bytes()
    else:
        model = seeded_model(global_model.model_id, global_model.seed, global_model.init_scheme)
        load_deltas_(model, global_model)
        opt = DropBack(model.parameters(), lr=lr, k=plan.k, freeze_after=freeze)
        opt.set_tracked(initial_at_tracked(global_model))
        probe = PeakProbe(lambda: held_bytes(model, opt), step_key)
        loss = train_epochs(model, opt, data, config.local_epochs, config.batch_size, seed, probe)
        update = sparse_from_optimizer(model, opt, global_model.seed, global_model.model_id)
        state_bytes = opt.state_bytes()
    budget = profile.state_budget_bytes
    if probe.peak_bytes is not None and probe.peak_bytes > budget:
        # Reported, not refused: the measurement also sees other threads' Python allocations.
        log.warning(
            "measured step peak %d bytes > budget %d (%s trainer, k=%d, stated %d)",
            probe.peak_bytes, budget, plan.mode, plan.k, plan.peak_bytes,
        )  # fmt: skip
    return LocalUpdate(
        model=update,
        num_examples=len(data),
        train_loss=loss,
        k=plan.k,
        state_bytes=state_bytes,
        budget_bytes=budget,
        trainer=plan.mode,
        peak_bytes=probe.peak_bytes,
    )


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
    k = client_plan(profile, config).k  # the k DropBack would get on this device: a like-for-like race
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
    from dropfleet.common.model.torch_model import materialize

    model = materialize(global_model)
    recalibrate_batch_norm(model, calibration)
    return evaluate(model, data)
