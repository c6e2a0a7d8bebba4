"""Server optimizers on the sparse global delta against dense FedAvgM / FedAdam / FedYogi references."""

import numpy as np
import pytest

from dropfleet.common.aggregate.merge import combine, top_k
from dropfleet.common.aggregate.server_opt import ServerAdam, ServerMomentum
from dropfleet.common.errors import ConfigError
from tests.factories import random_sparse_model

N = 89_610


def dense(positions, values):
    out = np.zeros(N)
    out[positions] = values
    return out


def test_matches_dense_fedavgm_over_rounds():
    momentum, lr, big_k = 0.5, 0.8, 4000
    opt = ServerMomentum(N, momentum, lr)
    published = (np.zeros(0, np.int64), np.zeros(0))
    ref_published, ref_velocity = np.zeros(N), np.zeros(N)
    for r in range(4):
        updates = [(random_sparse_model(2000, 10 * r + i, 3, scale=1.0), 1.0 + i) for i in range(3)]
        merged = combine(updates, rule="tracked-mean")
        # Flower's FedAvgM: pseudo-gradient old - new; v = m v + g; new = old - lr v (signs flipped here).
        ref_velocity = momentum * ref_velocity + (dense(*merged) - ref_published)
        ref_new = ref_published + lr * ref_velocity
        positions, values = top_k(*opt.step(published, merged), big_k)
        ref_positions, ref_values = top_k(np.flatnonzero(ref_new), ref_new[np.flatnonzero(ref_new)], big_k)
        assert np.array_equal(positions, ref_positions)
        np.testing.assert_allclose(values, ref_values, rtol=1e-12)
        published, ref_published = (positions, values), dense(ref_positions, ref_values)


def test_without_momentum_and_with_unit_rate_it_is_the_merge():
    merged = combine([(random_sparse_model(1500, s, 3, scale=1.0), 1.0) for s in range(3)])
    published = top_k(*combine([(random_sparse_model(800, 9, 3, scale=1.0), 1.0)]), 800)
    positions, values = ServerMomentum(N, 0.0, 1.0).step(published, merged)
    np.testing.assert_allclose(dense(positions, values), dense(*merged), atol=1e-12)


def test_a_weight_nobody_tracks_keeps_moving_with_its_velocity():
    opt = ServerMomentum(10, 0.9, 1.0)
    pos = np.array([3])
    published = opt.step((pos[:0], np.zeros(0)), (pos, np.array([1.0])))
    assert published[1][0] == pytest.approx(1.0)
    # Round 2: nobody tracks 3 (the merge resets it to w0), but the velocity still carries it.
    positions, values = opt.step(published, (pos[:0], np.zeros(0)))
    assert list(positions) == [3] and values[0] == pytest.approx(1.0 + (0.9 * 1.0 - 1.0))


@pytest.mark.parametrize(("momentum", "lr"), [(-0.1, 1.0), (1.0, 1.0), (0.5, 0.0), (0.5, float("inf"))])
def test_refuses_bad_settings(momentum, lr):
    with pytest.raises(ConfigError):
        ServerMomentum(N, momentum, lr)


def _flower_adam_step(state, current, aggregated, server_round, eta, beta1, beta2, tau, yogi):
    """Flower 1.42's FedAdam / FedYogi aggregate_train on one flat array (flwr/serverapp/strategy)."""
    delta = aggregated - current
    state["m"] = beta1 * state["m"] + (1 - beta1) * delta
    if yogi:
        state["v"] = state["v"] - (1.0 - beta2) * (delta**2) * np.sign(state["v"] - delta**2)
        return current + eta * state["m"] / (np.sqrt(state["v"]) + tau)
    state["v"] = beta2 * state["v"] + (1 - beta2) * (delta**2)
    eta_norm = (
        eta * np.sqrt(1 - np.power(beta2, server_round + 1.0)) / (1 - np.power(beta1, server_round + 1.0))
    )
    return current + eta_norm * state["m"] / (np.sqrt(state["v"]) + tau)


@pytest.mark.parametrize("yogi", [False, True])
def test_matches_flowers_fedadam_and_fedyogi_over_rounds(yogi):
    eta, beta1, beta2, tau, big_k = 0.1, 0.9, 0.99, 1e-3, 4000
    opt = ServerAdam(N, eta, beta1, beta2, tau, yogi=yogi)
    published = (np.zeros(0, np.int64), np.zeros(0))
    ref = {"m": np.zeros(N), "v": np.zeros(N)}
    ref_published = np.zeros(N)
    for server_round in (1, 2, 3, 4):
        updates = [(random_sparse_model(2000, 10 * server_round + i, 3, scale=1.0), 1.0) for i in range(3)]
        merged = combine(updates, rule="tracked-mean")
        ref_new = _flower_adam_step(
            ref, ref_published, dense(*merged), server_round, eta, beta1, beta2, tau, yogi
        )
        positions, values = top_k(*opt.step(published, merged), big_k)
        nonzero = np.flatnonzero(ref_new)
        ref_positions, ref_values = top_k(nonzero, ref_new[nonzero], big_k)
        assert np.array_equal(positions, ref_positions)
        np.testing.assert_allclose(values, ref_values, rtol=1e-12)
        published, ref_published = (positions, values), dense(ref_positions, ref_values)


@pytest.mark.parametrize(
    "make", [lambda: ServerMomentum(N, 0.7, 1.0), lambda: ServerAdam(N, 0.1, 0.9, 0.99, 1e-3)]
)
def test_a_restored_optimizer_continues_exactly(make):
    """What a resumed run does: state() after round 2, load() into a fresh optimizer, round 3 the same."""
    rounds = [
        combine([(random_sparse_model(2000, 7 * r + i, 3, scale=1.0), 1.0) for i in range(2)])
        for r in range(3)
    ]
    straight, published = make(), (np.zeros(0, np.int64), np.zeros(0))
    history = []
    for merged in rounds:
        published = top_k(*straight.step(published, merged), 3000)
        history.append(published)
    resumed = make()
    first = make()
    p = (np.zeros(0, np.int64), np.zeros(0))
    for merged in rounds[:2]:
        p = top_k(*first.step(p, merged), 3000)
    resumed.load(first.state())
    positions, values = top_k(*resumed.step(history[1], rounds[2]), 3000)
    assert np.array_equal(positions, history[2][0]) and np.array_equal(values, history[2][1])


def test_load_refuses_state_of_another_shape_kind_or_values():
    opt = ServerMomentum(5, 0.5, 1.0)
    with pytest.raises(ConfigError, match="unreadable"):
        opt.load(b"not an npz")
    with pytest.raises(ConfigError, match="5 finite floats"):
        opt.load(ServerMomentum(4, 0.5, 1.0).state())
    with pytest.raises(ConfigError, match="expected"):
        opt.load(ServerAdam(5, 0.1, 0.9, 0.99, 1e-3).state())  # another optimizer's moments
    poisoned = ServerMomentum(5, 0.5, 1.0)
    poisoned.velocity[2] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        opt.load(poisoned.state())
    source = ServerMomentum(5, 0.5, 1.0)
    source.velocity[:] = np.arange(5.0)
    opt.load(source.state())
    assert np.array_equal(opt.velocity, np.arange(5.0))


@pytest.mark.parametrize(("beta1", "beta2", "tau"), [(1.0, 0.99, 1e-3), (0.9, -0.1, 1e-3), (0.9, 0.99, 0.0)])
def test_adam_refuses_bad_settings(beta1, beta2, tau):
    with pytest.raises(ConfigError):
        ServerAdam(N, 0.1, beta1, beta2, tau)
