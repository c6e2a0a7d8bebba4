"""Training and evaluation loops on the lean runtime, as `common/device/train.py`'s are for torch.

A lean trainer (`LeanDropBack`, `LeanStreamingDropBack`) is model and
optimizer in one: `train_step(x, y)` takes a DropBack step on a batch,
`forward(x)` gives logits, `training` picks batch norm's batch or running
statistics. The batch order is NumPy's (`epoch_order`): torch's `randperm`
cannot be reproduced without torch, so a lean device and a torch device of the
same seed see the same examples in different orders.
"""

import tracemalloc
from collections.abc import Callable, Hashable
from typing import Protocol

import numpy as np

from dropfleet.common.device.evaluation import EvalResult
from dropfleet.common.device.lean.network import cross_entropy


class Images(Protocol):
    """Model inputs, indexed by batch: an array, or a board's stored images normalized as read
    (client/lean.py `StoredImages`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray: ...


class LeanModel(Protocol):
    """What evaluation needs: logits, and batch norm's mode, momentum and statistics
    (a `Network`, or a trainer)."""

    training: bool
    bn_momentum: float
    buffers: dict[str, np.ndarray]

    def forward(self, x: np.ndarray) -> np.ndarray: ...


class LeanTrainer(LeanModel, Protocol):
    def train_step(self, x: np.ndarray, labels: np.ndarray) -> float: ...


# First-step peaks measured in this process, by what the step's memory depends on.
_measured_peaks: dict[Hashable, int] = {}


class LeanPeakProbe:
    """The first training step's peak: what the trainer holds when it starts plus what the step
    allocates (tracemalloc sees every NumPy array), measured once per `key` in a process, as
    `train.PeakProbe` measures a torch step. `peak_bytes` stays None when another tracer runs."""

    def __init__(self, held: Callable[[], int], key: Hashable | None = None) -> None:
        self.held, self.key = held, key
        self.peak_bytes: int | None = None

    def measure(self, step: Callable[[], float]) -> float:
        if self.key is not None and self.key in _measured_peaks:
            self.peak_bytes = _measured_peaks[self.key]
            return step()
        if tracemalloc.is_tracing():  # someone else's trace: leave it alone
            return step()
        at_start = self.held()
        tracemalloc.start()
        try:
            loss = step()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.peak_bytes = at_start + peak
        if self.key is not None:
            _measured_peaks[self.key] = self.peak_bytes
        return loss


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a device's n examples in one epoch: the same on every machine for a seed."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_epochs(
    trainer: LeanTrainer,
    images: Images,
    labels: np.ndarray,
    epochs: int,
    batch_size: int,
    seed: int,
    probe: LeanPeakProbe | None = None,
) -> float:
    """Run `epochs` shuffled passes; returns the mean training loss of the last one.

    With `probe`, the first step's memory peak is measured into it."""
    trainer.training = True
    mean_loss = float("nan")
    for epoch in range(epochs):
        order = epoch_order(len(labels), seed, epoch)
        total, batches = 0.0, 0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            x, y = images[idx], labels[idx]
            if probe is not None and epoch == 0 and batches == 0:
                total += probe.measure(lambda x=x, y=y: trainer.train_step(x, y))
            else:
                total += trainer.train_step(x, y)
            batches += 1
        mean_loss = total / max(batches, 1)
    return mean_loss


def evaluate(trainer: LeanModel, images: Images, labels: np.ndarray, batch_size: int = 1000) -> EvalResult:
    """Mean cross-entropy loss and accuracy over the examples (batch norm on running statistics)."""
    trainer.training = False
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size]
        out = trainer.forward(images[start : start + batch_size])
        loss, _ = cross_entropy(out, y)
        loss_sum += loss * len(y)
        correct += int((out.argmax(1) == y).sum())
    n = len(labels)
    return EvalResult(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), examples=n)


def recalibrate_batch_norm(
    trainer: LeanModel, images: Images, batches: int = 20, batch_size: int = 256
) -> None:
    """Re-estimate batch-norm running statistics from the examples: a cumulative average over the
    calibration batches from torch's initial values, as `train.recalibrate_batch_norm` does."""
    if not trainer.buffers:
        return
    for name, buffer in trainer.buffers.items():
        buffer[...] = 0.0 if name.endswith("running_mean") else 1.0
    momentum, trainer.training = trainer.bn_momentum, True
    try:
        for t, start in enumerate(range(0, min(len(images), batches * batch_size), batch_size), start=1):
            trainer.bn_momentum = 1.0 / t  # torch's momentum=None: the t-th batch weighs 1/t
            trainer.forward(images[start : start + batch_size])
    finally:
        trainer.bn_momentum = momentum
