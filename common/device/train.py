"""Training and evaluation loops shared by the benchmark, the client and the server."""

from collections.abc import Callable, Hashable

import torch
from torch import nn
from torch.optim import Optimizer

from dropfleet.common.device.data import Split
from dropfleet.common.device.evaluation import EvalResult
from dropfleet.common.device.footprint import can_measure, measure_step_peak

# Step peaks measured in this process, by the key their probe named (see PeakProbe).
_measured_peaks: dict[Hashable, int] = {}


class PeakProbe:
    """Measures the peak memory of the first training step: what is held when it starts plus its peak.

    `held` returns the bytes the model and optimizer hold (after zero_grad).
    `peak_bytes` stays None when the measurement could not run (another
    profiler active in this process): training goes on unmeasured.

    With `key`, naming everything the step's memory depends on (trainer, k,
    model, batch shape, the state it starts from), the peak is measured once
    per key in a process and reused after: the same step allocates the same,
    and profiling every round would cost each round a profiler session.
    """

    def __init__(self, held: Callable[[], int], key: Hashable | None = None) -> None:
        self.held = held
        self.key = key
        self.peak_bytes: int | None = None

    def measure(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.key is not None and self.key in _measured_peaks:
            self.peak_bytes = _measured_peaks[self.key]
            return step()
        if not can_measure():
            return step()
        at_start = self.held()
        out: list[torch.Tensor] = []
        self.peak_bytes = at_start + measure_step_peak(lambda: out.append(step()))
        if self.key is not None:
            _measured_peaks[self.key] = self.peak_bytes
        return out[0]


def train_epochs(
    model: nn.Module,
    optimizer: Optimizer,
    data: Split,
    epochs: int,
    batch_size: int,
    seed: int,
    probe: PeakProbe | None = None,
) -> float:
    """Run `epochs` shuffled passes; returns the mean training loss of the last one.

    With `probe`, the first step's memory peak is measured into it.
    """
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            x, y = data.images[idx], data.labels[idx]
            optimizer.zero_grad()

            def step(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                return loss

            loss = probe.measure(step) if probe is not None and epoch == 0 and batches == 0 else step()
            total += loss.item()
            batches += 1
        mean_loss = total / max(batches, 1)
    return mean_loss


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 1000) -> EvalResult:
    """Mean cross-entropy loss and accuracy over `data`."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size]
        y = data.labels[start : start + batch_size]
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
    n = len(data)
    return EvalResult(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), examples=n)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, data: Split, batches: int = 20, batch_size: int = 256) -> None:
    """Re-estimate batch-norm running statistics from `data`.

    A sparse model carries weights (BN scale and shift included) but no running
    statistics, which are buffers; a receiver rebuilds them before evaluating.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for start in range(0, min(len(data), batches * batch_size), batch_size):
        model(data.images[start : start + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
