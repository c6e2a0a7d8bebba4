"""The server's update memory (MIFA) against a dense reference: each device's latest change replayed."""

import numpy as np
import pytest

from dropfleet.common.aggregate.merge import combine, next_global
from dropfleet.common.aggregate.update_memory import UpdateMemory
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import dense_deltas
from tests.factories import random_sparse_model


def flat(model) -> np.ndarray:
    return np.concatenate([d.reshape(-1) for d in dense_deltas(model).values()]).astype(np.float64)


def device(k: int, seed: int):
    return random_sparse_model(k, seed, 3, scale=1.0)


def test_a_device_that_sits_out_contributes_its_last_change_on_the_new_global():
    memory = UpdateMemory(max_age=5)
    g1, g2 = device(3000, 100), device(3000, 101)  # the globals of rounds 1 and 2
    a1, b1, a2 = device(800, 1), device(900, 2), device(700, 3)
    memory.augment(1, g1, [(7, a1, 10.0), (8, b1, 30.0)])
    merging = memory.augment(2, g2, [(7, a2, 20.0)])  # node 8 sits round 2 out
    assert len(merging) == 2 and merging[0][0] is a2 and merging[0][1] == 20.0 and merging[1][1] == 30.0

    # Dense reference: node 8's change against g1, where it tracked, added to g2.
    tracked_b = flat(b1) != 0
    replayed = np.where(tracked_b, flat(g2) + flat(b1) - flat(g1), 0.0)
    np.testing.assert_allclose(flat(merging[1][0]), replayed, rtol=1e-6, atol=1e-6)
    # tracked-mean: each coordinate averages the changes of the devices that track it
    positions, values = combine(merging, "tracked-mean")
    a_tracked = flat(a2) != 0
    w = 20.0 * a_tracked + 30.0 * tracked_b
    sums = 20.0 * flat(a2) + 30.0 * replayed
    expected = np.divide(sums, w, out=np.zeros_like(sums), where=w > 0)
    dense = np.zeros_like(expected)
    dense[positions] = values
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6)


def test_every_device_fresh_changes_nothing():
    memory = UpdateMemory(max_age=30)
    g = device(3000, 100)
    for r in (1, 2):
        fresh = [(n, device(800, 10 * r + n), float(n + 1)) for n in range(4)]
        merging = memory.augment(r, g, fresh)
        assert [(id(m), w) for m, w in merging] == [(id(m), w) for _, m, w in fresh]
    plain = next_global(g, merging, 4000, rule="tracked-mean")
    again = next_global(g, memory.augment(3, g, fresh), 4000, rule="tracked-mean")
    np.testing.assert_array_equal(flat(plain), flat(again))


def test_updates_older_than_max_age_are_dropped():
    memory = UpdateMemory(max_age=2)
    g = device(2000, 100)
    memory.augment(1, g, [(1, device(500, 1), 1.0), (2, device(500, 2), 1.0)])
    assert len(memory.augment(2, g, [(1, device(500, 3), 1.0)])) == 2  # node 2's round-1 update, age 1
    merging = memory.augment(3, g, [(1, device(500, 4), 1.0)])  # age 2: gone
    assert len(merging) == 1 and len(memory) == 1
    assert memory.nbytes == 500 * (4 + 4)  # int32 positions, float32 changes


def test_forget_drops_a_node():
    memory = UpdateMemory(max_age=10)
    g = device(2000, 100)
    memory.augment(1, g, [(1, device(500, 1), 1.0), (2, device(500, 2), 1.0)])
    memory.forget(2)
    memory.forget(99)  # unknown: nothing to do
    assert len(memory.augment(2, g, [(1, device(500, 3), 1.0)])) == 1


def test_a_fresh_update_replaces_the_kept_one():
    memory = UpdateMemory(max_age=10)
    g = device(2000, 100)
    memory.augment(1, g, [(1, device(500, 1), 1.0)])
    newer = device(600, 2)
    memory.augment(2, g, [(1, newer, 4.0)])
    (replayed, weight), *_ = memory.augment(3, g, [(2, device(500, 3), 1.0)])[1:]
    assert weight == 4.0
    np.testing.assert_allclose(flat(replayed), flat(newer), rtol=1e-6)  # same global: the same model


def test_max_age_below_one_is_refused():
    with pytest.raises(ConfigError, match="update memory"):
        UpdateMemory(max_age=0)


def test_each_node_is_charged_its_own_k_and_the_memory_stays_under_its_cap(caplog):
    """8 bytes per weight a node actually sent; past the server-wide cap the oldest kept updates
    go first (logged), and what is merged this round is unaffected."""
    small, large = device(300, 1), device(3000, 2)
    memory = UpdateMemory(max_age=10)
    memory.augment(1, device(3000, 100), [(1, small, 1.0), (2, large, 1.0)])
    assert memory.nbytes == 8 * (300 + 3000)  # each at its own k, not at the largest k allowed
    capped = UpdateMemory(max_age=10, max_bytes=8 * 7000)
    g = device(3000, 100)
    capped.augment(1, g, [(1, device(3000, 11), 1.0)])
    capped.augment(2, g, [(2, device(3000, 12), 1.0)])
    with caplog.at_level("WARNING", logger="dropfleet.common.aggregate.update_memory"):
        merging = capped.augment(3, g, [(3, device(3000, 13), 1.0)])
    assert capped.nbytes <= 8 * 7000 and len(capped) == 2 and capped.evicted == 1
    assert len(merging) == 2  # node 3 fresh, node 2 replayed: node 1, the oldest, was forgotten
    assert "over its cap" in caplog.text and "forgot the 1 oldest" in caplog.text
    with pytest.raises(ConfigError, match="cap"):
        UpdateMemory(max_age=1, max_bytes=0)
