"""Training and evaluation loops shared by the benchmark, the client and the server."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from dropfleet.common.data import Split


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    examples: int


def train_epochs(
    model: nn.Module,
    optimizer: Optimizer,
    data: Split,
    epochs: int,
    batch_size: int,
    seed: int,
) -> float:
    """Run `epochs` shuffled passes; returns the mean training loss of the last one."""
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.images[idx]), data.labels[idx])
            loss.backward()
            optimizer.step()
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
