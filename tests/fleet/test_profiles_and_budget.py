"""Device profiles: the budget decides the trainer and k, a device's measured peak stays inside it."""

import numpy as np
import pytest

from dropfleet.client.local import local_data, train_sparse
from dropfleet.client.round import client_plan, is_available
from dropfleet.common.aggregate.merge import merge_sparse
from dropfleet.common.device.budget import available_backend
from dropfleet.common.errors import BudgetError, ConfigError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import (
    get_profile,
    load_profiles,
    plan_training,
    profile_for_partition,
    trainer_footprint,
)
from tests.factories import random_sparse_model

N = 89_610
C = "compiled"  # the k table in profiles.toml is for boards with numba
FLEET = ("mcu-512k", "pi-zero-512m", "pi4-4g", "jetson-8g")


def test_profiles_file_has_the_fleet():
    profiles = load_profiles()
    assert set(FLEET) <= set(profiles)
    plans = [plan_training(profiles[p].state_budget_bytes, "mlp-90k", 32, 100, backend=C) for p in FLEET]
    assert [p.mode for p in plans] == ["streaming-blocks", "streaming", "dense", "dense"]
    assert [p.k for p in plans] == [2_424, 5_456, 10_917, 21_840]  # documented in profiles.toml


def test_a_board_without_numba_plans_for_the_numpy_references():
    # Regenerating w0 with NumPy needs more scratch: pi-zero streams in blocks, mcu-512k cannot train.
    budget = get_profile("pi-zero-512m").state_budget_bytes
    plan = plan_training(budget, "mlp-90k", 32, 100, backend="numpy")
    assert (plan.mode, plan.k) == ("streaming-blocks", 10_761)
    with pytest.raises(BudgetError, match="with the numpy backend"):
        plan_training(get_profile("mcu-512k").state_budget_bytes, "mlp-90k", 32, 100, backend="numpy")
    for name in ("pi4-4g", "jetson-8g"):  # dense steps do not regenerate: the same plan
        budget = get_profile(name).state_budget_bytes
        assert plan_training(budget, "mlp-90k", 32, 100, backend="numpy") == plan_training(
            budget, "mlp-90k", 32, 100, backend=C
        )


def test_the_device_plans_with_the_backend_it_has():
    config = RunConfig(strategy="dropback")
    for name in FLEET:
        profile = get_profile(name)
        expected = plan_training(profile.state_budget_bytes, "mlp-90k", 32, 100, backend=available_backend())
        assert client_plan(profile, config) == expected


def test_the_plan_takes_the_largest_k_that_fits_the_fastest_trainer():
    for budget in (320_000, 400_000, 2_000_000, 3_000_000, 4_000_000, 10**7):
        plan = plan_training(budget, "mlp-90k", 32, 100, backend=C)
        assert plan.peak_bytes <= budget
        assert plan.k == N or plan.footprint.bytes(plan.k + 1) > budget
        faster = {"streaming-blocks": ["dense", "streaming"], "streaming": ["dense"], "dense": []}[plan.mode]
        for mode in faster:  # a faster trainer would not hold even the minimum model
            assert trainer_footprint(mode, "mlp-90k", 32, backend=C).bytes(100) > budget
    assert plan_training(10**9, "mlp-90k", 32, 100, backend=C).k == N


def test_a_board_that_streams_by_choice_spends_its_budget_on_k():
    budget = get_profile("pi4-4g").state_budget_bytes
    dense = plan_training(budget, "mlp-90k", 32, 100, backend=C)
    streamed = plan_training(budget, "mlp-90k", 32, 100, streaming_only=True, backend=C)
    assert streamed.streaming and streamed.k > dense.k and streamed.peak_bytes <= budget


def test_the_batch_size_and_the_model_change_the_plan():
    budget = get_profile("pi4-4g").state_budget_bytes
    with pytest.raises(BudgetError, match=r"cnn-bn-prelu at batch 32 .* needs \d+ bytes"):
        plan_training(budget, "cnn-bn-prelu", 32, 100, backend=C)  # its activations alone exceed the budget
    assert plan_training(budget, "cnn-bn-prelu", 8, 100, backend=C).mode == "dense"


def test_too_small_budget_refuses_with_a_clear_reason():
    with pytest.raises(BudgetError, match="cannot hold a training step"):
        plan_training(get_profile("dust-1k").state_budget_bytes, "mlp-90k", 32, 100, backend=C)


def test_unknown_profile_and_mix():
    with pytest.raises(ConfigError, match="toaster"):
        get_profile("toaster")
    assert profile_for_partition(5, ["mcu-512k", "pi4-4g"]).name == "pi4-4g"


def test_availability_is_reproducible_and_near_the_profile_rate():
    profile = get_profile("mcu-512k")
    config = RunConfig(strategy="dropback")
    draws = [is_available(profile, config, r, p) for r in range(50) for p in range(20)]
    assert draws == [is_available(profile, config, r, p) for r in range(50) for p in range(20)]
    assert 0.85 < np.mean(draws) < 0.95


@pytest.mark.parametrize("profile_name", FLEET)
def test_a_device_never_exceeds_its_budget(profile_name):
    config = RunConfig(strategy="dropback", train_subset=400, partitioner="iid")
    profile = get_profile(profile_name)
    train, _ = local_data(config, 0, 10)
    # Start from a global set larger than any device's k: it must be trimmed.
    big = merge_sparse([(_random_model(30_000, s), 1.0) for s in range(2)], 40_000)
    update = train_sparse(big, train, profile, config, server_round=1)
    plan = client_plan(profile, config)
    assert update.model.num_tracked <= plan.k == update.k and update.trainer == plan.mode
    assert update.peak_bytes is not None  # measured in the first step
    assert update.peak_bytes <= plan.peak_bytes <= profile.state_budget_bytes
    assert update.state_bytes < update.peak_bytes


def _random_model(k, seed):
    return random_sparse_model(k, seed, RunConfig(strategy="dropback").seed)


def test_empty_global_model_starts_training():
    config = RunConfig(strategy="dropback", train_subset=300, partitioner="iid")
    train, val = local_data(config, 1, 10)
    assert len(train) == 270 and len(val) == 30
    update = train_sparse(SparseModel.empty("mlp-90k", 0), train, get_profile("mcu-512k"), config, 1)
    assert update.model.num_tracked == update.k
    assert update.num_examples == 270 and np.isfinite(update.train_loss)


def test_a_device_streams_by_choice_within_the_same_budget():
    config = RunConfig(strategy="dropback", train_subset=300, partitioner="iid")
    train, _ = local_data(config, 2, 10)
    start = merge_sparse([(_random_model(3_000, s), 1.0) for s in range(2)], 4_000)
    profile = get_profile("pi4-4g")
    ordinary = train_sparse(start, train, profile, config, 3)
    streamed = train_sparse(start, train, profile, config, 3, streaming_only=True)
    assert (ordinary.trainer, streamed.trainer) == ("dense", "streaming")
    assert streamed.k > ordinary.k and streamed.peak_bytes <= profile.state_budget_bytes
    assert streamed.state_bytes == 8 * streamed.model.num_tracked


def test_a_global_model_of_another_architecture_is_refused():
    config = RunConfig(strategy="dropback", train_subset=100, partitioner="iid")
    train, _ = local_data(config, 0, 10)
    with pytest.raises(ConfigError, match="the run trains 'mlp-90k'"):
        train_sparse(SparseModel.empty("lenet-300-100", 0), train, get_profile("pi4-4g"), config, 1)
