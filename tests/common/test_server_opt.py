"""Server momentum on the sparse global delta against a dense FedAvgM reference."""

import numpy as np
import pytest

from dropfleet.common.errors import ConfigError
from dropfleet.common.merge import combine, top_k
from dropfleet.common.server_opt import ServerMomentum
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


def test_load_refuses_a_wrong_or_non_finite_velocity():
    opt = ServerMomentum(5, 0.5, 1.0)
    with pytest.raises(ConfigError):
        opt.load(np.zeros(4))
    with pytest.raises(ConfigError):
        opt.load(np.array([0, 0, np.nan, 0, 0]))
    opt.load(np.arange(5.0))
    assert np.array_equal(opt.state(), np.arange(5.0))
