"""Device profiles: the budget decides k, a device never exceeds it, tiny budgets refuse."""

import numpy as np
import pytest

from dropfleet.client.local import client_k, is_available, local_data, train_sparse
from dropfleet.client.profiles import (
    budget_to_k,
    get_profile,
    load_profiles,
    profile_for_partition,
)
from dropfleet.common.codec import encode
from dropfleet.common.dropback import BYTES_PER_TRACKED, FIXED_STATE_BYTES
from dropfleet.common.errors import BudgetError, ConfigError
from dropfleet.common.merge import merge_sparse
from dropfleet.common.sparse import SparseModel
from dropfleet.fleet.config import RunConfig
from tests.factories import random_sparse_model

N = 89_610


def test_profiles_file_has_the_fleet():
    profiles = load_profiles()
    assert {"mcu-256k", "pi-zero-512m", "pi4-4g", "jetson-8g"} <= set(profiles)
    ks = [
        budget_to_k(profiles[p].state_budget_bytes, N, 100)
        for p in ("mcu-256k", "pi-zero-512m", "pi4-4g", "jetson-8g")
    ]
    assert ks == sorted(ks) and len(set(ks)) == 4 and ks[-1] < N  # all sparse, all different


def test_budget_to_k_is_the_largest_fitting_k():
    for budget in (2_000, 24_576, 65_536, 10**6):
        k = budget_to_k(budget, 10**9, 1)
        assert FIXED_STATE_BYTES + BYTES_PER_TRACKED * k <= budget
        assert FIXED_STATE_BYTES + BYTES_PER_TRACKED * (k + 1) > budget
    assert budget_to_k(10**9, N, 1) == N


def test_too_small_budget_refuses_with_a_clear_reason():
    with pytest.raises(BudgetError, match="cannot hold the minimum model"):
        budget_to_k(get_profile("dust-1k").state_budget_bytes, N, 100)


def test_unknown_profile_and_mix():
    with pytest.raises(ConfigError, match="toaster"):
        get_profile("toaster")
    assert profile_for_partition(5, ["mcu-256k", "pi4-4g"]).name == "pi4-4g"


def test_availability_is_reproducible_and_near_the_profile_rate():
    profile = get_profile("mcu-256k")
    config = RunConfig()
    draws = [is_available(profile, config, r, p) for r in range(50) for p in range(20)]
    assert draws == [is_available(profile, config, r, p) for r in range(50) for p in range(20)]
    assert 0.85 < np.mean(draws) < 0.95


@pytest.mark.parametrize("profile_name", ["mcu-256k", "pi-zero-512m", "pi4-4g", "jetson-8g"])
def test_a_device_never_exceeds_its_budget(profile_name):
    config = RunConfig(train_subset=400, partitioner="iid")
    profile = get_profile(profile_name)
    train, _ = local_data(config, 0, 10)
    # Start from a global set larger than any device's k: it must be trimmed.
    big = merge_sparse([(_random_model(30_000, s), 1.0) for s in range(2)], 40_000)
    update = train_sparse(big, train, profile, config, server_round=1)
    k = client_k(profile, config, N)
    assert update.model.num_tracked <= k == update.k
    assert update.state_bytes <= profile.state_budget_bytes
    assert FIXED_STATE_BYTES + BYTES_PER_TRACKED * update.model.num_tracked <= profile.state_budget_bytes


def _random_model(k, seed):
    return random_sparse_model(k, seed, RunConfig().seed)


def test_empty_global_model_starts_training():
    config = RunConfig(train_subset=300, partitioner="iid")
    train, val = local_data(config, 1, 10)
    assert len(train) == 270 and len(val) == 30
    update = train_sparse(SparseModel.empty("mlp-90k", 0), train, get_profile("mcu-256k"), config, 1)
    assert update.model.num_tracked == update.k
    assert update.num_examples == 270 and np.isfinite(update.train_loss)


def test_a_streaming_device_sends_the_same_update_with_less_state():
    config = RunConfig(train_subset=300, partitioner="iid")
    train, _ = local_data(config, 2, 10)
    start = merge_sparse([(_random_model(3_000, s), 1.0) for s in range(2)], 4_000)
    profile = get_profile("pi-zero-512m")
    ordinary = train_sparse(start, train, profile, config, 3)
    streamed = train_sparse(start, train, profile, config, 3, streaming=True)
    assert encode(streamed.model, "fp32") == encode(ordinary.model, "fp32")  # bit for bit on the wire
    assert streamed.train_loss == ordinary.train_loss and streamed.k == ordinary.k
    assert streamed.state_bytes < ordinary.state_bytes
