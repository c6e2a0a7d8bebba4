"""Device profiles (fleet/profiles.toml) and how a memory budget decides the trainer and k.

Torch-free and numba-free: the REST API and the ServerApp plan what a device
will do from the closed-form footprints (`common/device/budget.py`) with the
backend named, and the device computes the same plan with its own backend.
"""

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dropfleet.common.device.budget import (
    DEFAULT_BLOCK_WEIGHTS,
    Footprint,
    StepBackend,
    TrainingMode,
    activation_bytes,
    dense_footprint,
    streaming_footprint,
)
from dropfleet.common.errors import BudgetError, ConfigError
from dropfleet.common.model.layout import model_layout

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    state_budget_bytes: int
    cpus: float
    speed: float
    availability: float


@cache
def load_profiles(path: Path = PROFILES_FILE) -> dict[str, DeviceProfile]:
    """All profiles in the TOML file, validated."""
    raw = tomllib.loads(path.read_text())
    out = {}
    for name, p in raw.items():
        try:
            profile = DeviceProfile(
                name,
                int(p["memory-bytes"]),
                int(p["state-budget-bytes"]),
                float(p["cpus"]),
                float(p["speed"]),
                float(p["availability"]),
            )
        except KeyError as exc:
            raise ConfigError(f"profile {name!r} lacks {exc.args[0]!r}") from None
        if not 0 <= profile.availability <= 1 or profile.state_budget_bytes <= 0:
            raise ConfigError(f"profile {name!r} has an out-of-range value")
        out[name] = profile
    return out


def get_profile(name: str) -> DeviceProfile:
    profiles = load_profiles()
    if name not in profiles:
        raise ConfigError(f"unknown device profile {name!r}; known: {sorted(profiles)}")
    return profiles[name]


def profile_for_partition(partition_id: int, mix: list[str]) -> DeviceProfile:
    """Simulation: a node's profile by its partition id, round robin over the mix."""
    if not mix:
        raise ConfigError("fleet-mix is empty")
    return get_profile(mix[partition_id % len(mix)])


@dataclass(frozen=True)
class TrainingPlan:
    """How a device trains under its budget: the trainer, its k, and the step peak it states."""

    mode: TrainingMode
    k: int
    footprint: Footprint
    block_weights: int | None = None

    @property
    def streaming(self) -> bool:
        return self.mode != "dense"

    @property
    def peak_bytes(self) -> int:
        return self.footprint.bytes(self.k)


def trainer_footprint(
    mode: TrainingMode,
    model_id: str,
    batch_size: int,
    block_weights: int | None = None,
    *,
    backend: StepBackend,
) -> Footprint:
    """The step footprint that `mode`'s trainer states for this model and batch size.

    `backend` is how a streaming step would compute (`budget.available_backend()` on the
    device itself); the dense trainer's footprint does not depend on it.
    """
    activations = activation_bytes(model_id, batch_size)
    if mode == "dense":
        return dense_footprint(model_layout(model_id), activations)
    return streaming_footprint(model_id, activations, block_weights, backend)


@cache
def plan_training(
    budget_bytes: int,
    model_id: str,
    batch_size: int,
    min_k: int,
    streaming_only: bool = False,
    *,
    backend: StepBackend,
) -> TrainingPlan:
    """The fastest trainer whose step peak fits `budget_bytes` with at least `min_k` tracked weights.

    k is the largest that fits that trainer (capped at the model size): a budget
    that cannot hold the dense model's step trains streaming, one layer at a
    time, or in row blocks when not even a layer fits. `streaming_only` skips
    the dense trainer (a board that wants its budget spent on k, not speed).
    `backend`: how the device's streaming steps compute, which changes their
    peak (a device passes `budget.available_backend()`; a server, which cannot
    know, asks for each backend). Raises `BudgetError` when no trainer fits `min_k`.
    """
    n = model_layout(model_id).numel
    modes: list[tuple[TrainingMode, int | None]] = [
        ("dense", None),
        ("streaming", None),
        ("streaming-blocks", DEFAULT_BLOCK_WEIGHTS),
    ]
    smallest = None
    for mode, block in modes[1:] if streaming_only else modes:
        try:
            footprint = trainer_footprint(mode, model_id, batch_size, block, backend=backend)
        except ConfigError:  # row blocks need a Linear/ReLU model
            continue
        k = min(footprint.max_k(budget_bytes), n)
        if k >= min_k:
            return TrainingPlan(mode, k, footprint, block)
        smallest = footprint.bytes(min_k) if smallest is None else min(smallest, footprint.bytes(min_k))
    raise BudgetError(
        f"memory budget of {budget_bytes} bytes cannot hold a training step of {model_id} at batch "
        f"{batch_size} with the minimum {min_k} tracked weights (the leanest trainer needs {smallest} bytes "
        f"with the {backend} backend)"
    )
