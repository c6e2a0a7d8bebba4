"""What a device does in a round on the lean runtime: `client/local.py`'s DropBack round on NumPy alone.

A board without torch (node config `runtime = "lean"`) trains here: its own
data (node config `data-dir`; the lean runtime never imports the partitioner's
`datasets`), the plan its budget allows (`client/round.py`), and the lean
trainers (`common/device/lean/`), which keep the torch trainers' tracked sets
and send the same wire format. The batch order is NumPy's (`lean/train.py`).
The DropBack strategies run here; the dense and top-k baselines need torch.
"""

from dataclasses import dataclass
from functools import cache

import numpy as np

from dropfleet.client.round import LocalUpdate, round_schedule, train_and_validation
from dropfleet.common.device.data_files import normalize, read_device_data
from dropfleet.common.device.evaluation import EvalResult
from dropfleet.common.device.lean.dropback import LeanDropBack
from dropfleet.common.device.lean.network import seeded_network
from dropfleet.common.device.lean.streaming import LeanStreamingDropBack
from dropfleet.common.device.lean.train import LeanPeakProbe, evaluate, recalibrate_batch_norm, train_epochs
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import DeviceProfile


@dataclass(frozen=True)
class StoredImages:
    """A board's images as stored, uint8 [n, 28, 28], normalized a batch at a time as the trainers
    index them (float32 [b, 1, 28, 28]): a board holds one byte per pixel, not four (30,000
    examples: 24 MB, not 94), and its train and validation splits are rows of the one copy.
    `normalize` is elementwise, so a batch has the bits it would have had were every image
    normalized first."""

    raw: np.ndarray
    rows: np.ndarray  # which of `raw`'s images, in order

    @classmethod
    def of(cls, raw: np.ndarray) -> "StoredImages":
        return cls(raw, np.arange(len(raw)))

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return normalize(self.raw[self.rows[index]])

    def subset(self, indices: np.ndarray) -> "StoredImages":
        return StoredImages(self.raw, self.rows[indices])


@dataclass(frozen=True)
class Examples:
    """A board's images (normalized as read) and int64 labels: the lean runtime's `Split`."""

    images: StoredImages
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> "Examples":
        return Examples(self.images.subset(indices), self.labels[indices])


@cache
def local_data(
    config: RunConfig, partition_id: int, num_partitions: int, data_dir: str | None = None
) -> tuple[Examples, Examples]:
    """This board's own examples, split into local train and validation as `local.local_data` splits
    a device's own data (the same shuffle by the run's seed)."""
    if not data_dir:
        raise ConfigError(
            "the lean runtime trains on the board's own data: set the node config data-dir "
            "(train.npz or Fashion-MNIST's IDX files)"
        )
    images, labels = read_device_data(data_dir)
    own = Examples(StoredImages.of(images), labels.astype(np.int64))
    idx = np.random.default_rng(config.seed).permutation(len(own))
    return train_and_validation(own, idx, config)


def train_sparse(
    global_model: SparseModel,
    data: Examples,
    profile: DeviceProfile,
    config: RunConfig,
    server_round: int,
    streaming_only: bool = False,
) -> LocalUpdate:
    """Start from the published global set (trimmed to this device's k) and run DropBack, as
    `local.train_sparse` does, the first step's peak measured with tracemalloc."""
    plan, freeze, seed, lr = round_schedule(
        global_model, len(data), profile, config, server_round, streaming_only
    )
    model_id = global_model.model_id
    trainer: LeanStreamingDropBack | LeanDropBack
    if plan.streaming:
        trainer = LeanStreamingDropBack(
            model_id, global_model.seed, plan.k, lr, freeze, block_weights=plan.block_weights
        )
        trainer.load(global_model)
    else:
        network = seeded_network(model_id, global_model.seed, global_model.init_scheme)
        trainer = LeanDropBack(network, lr=lr, k=plan.k, freeze_after=freeze)
        trainer.start_from(global_model)
    # What the first step's memory depends on; rounds that repeat it reuse its measured peak.
    step_key = (
        "lean", plan.mode, plan.k, plan.block_weights, model_id, global_model.init_scheme,
        global_model.num_tracked, min(config.batch_size, len(data)),
    )  # fmt: skip
    probe = LeanPeakProbe(trainer.held_bytes, step_key)
    loss = train_epochs(
        trainer, data.images, data.labels, config.local_epochs, config.batch_size, seed, probe
    )
    if isinstance(trainer, LeanStreamingDropBack):
        update, state_bytes = trainer.to_sparse(), trainer.state.state_bytes()
    else:
        update, state_bytes = trainer.to_sparse(model_id, global_model.seed), trainer.state_bytes()
    return LocalUpdate(
        model=update,
        num_examples=len(data),
        train_loss=loss,
        k=plan.k,
        state_bytes=state_bytes,
        budget_bytes=profile.state_budget_bytes,
        trainer=plan.mode,
        peak_bytes=probe.peak_bytes,
    )


def evaluate_sparse(global_model: SparseModel, data: Examples, calibration: Examples) -> EvalResult:
    """Evaluate the global model; batch-norm statistics come from this node's training data."""
    network = seeded_network(global_model.model_id, global_model.seed, global_model.init_scheme)
    layout = model_layout(global_model.model_id)
    for t, slot in zip(global_model.tensors, layout.tensors, strict=True):
        network.params[slot.offset + t.indices.astype(np.int64)] += t.values.astype(np.float32)
    recalibrate_batch_norm(network, calibration.images)
    return evaluate(network, data.images, data.labels)
