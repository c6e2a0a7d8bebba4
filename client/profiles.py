"""Device profiles (client/profiles.toml) and how a memory budget decides k."""

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dropfleet.common.dropback import BYTES_PER_TRACKED, FIXED_STATE_BYTES
from dropfleet.common.errors import BudgetError, ConfigError

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


def budget_to_k(budget_bytes: int, num_weights: int, min_k: int) -> int:
    """The largest k whose DropBack state fits the budget (capped at the model size).

    Raises `BudgetError` when even `min_k` tracked weights do not fit.
    """
    k = (budget_bytes - FIXED_STATE_BYTES) // BYTES_PER_TRACKED
    need = FIXED_STATE_BYTES + BYTES_PER_TRACKED * min_k
    if k < min_k:
        raise BudgetError(
            f"state budget of {budget_bytes} bytes cannot hold the minimum model "
            f"({min_k} tracked weights need {need} bytes)"
        )
    return int(min(k, num_weights))
