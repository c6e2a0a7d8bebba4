"""Sparse merge against a dense reference: weighted mean of client models, global top-K."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.aggregate.merge import churn, merge_sparse
from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, dense_deltas, sparse_from_dense_delta
from tests.factories import random_sparse_model

SHAPES = model_layout("mlp-90k").shapes
N = sum(int(np.prod(s)) for s in SHAPES.values())


def client(k: int, seed: int, model_seed: int = 3) -> SparseModel:
    return random_sparse_model(k, seed, model_seed, scale=1.0)


def dense_reference(updates, big_k):
    total = sum(w for _, w in updates)
    mean = (
        sum(
            np.concatenate([d.reshape(-1) for d in dense_deltas(m).values()]).astype(np.float64) * w
            for m, w in updates
        )
        / total
    )
    return keep_top(mean, big_k)


def keep_top(mean, big_k):
    """The reference global budget: the big_k largest |mean|, ties to the lower index."""
    order = np.lexsort((np.arange(N), -np.abs(mean)))
    keep = order[:big_k]
    keep = keep[mean[keep] != 0]
    out = np.zeros(N)
    out[keep] = mean[keep]
    return out


def flat(model):
    return np.concatenate([d.reshape(-1) for d in dense_deltas(model).values()])


@pytest.mark.parametrize("big_k", [500, 3000, 20_000])
def test_matches_dense_reference(big_k):
    updates = [(client(1000, 1), 10.0), (client(2500, 2), 30.0), (client(600, 3), 5.0)]
    merged = merge_sparse(updates, big_k)
    merged.validate()
    np.testing.assert_allclose(flat(merged), dense_reference(updates, big_k).astype(np.float32), rtol=1e-6)
    assert merged.num_tracked == min(big_k, np.count_nonzero(dense_reference(updates, N)))


def test_global_k_may_exceed_every_client_k():
    updates = [(client(800, s), 1.0) for s in range(5)]
    merged = merge_sparse(updates, 10_000)
    assert merged.num_tracked > 800


def test_overlapping_entries_average_with_untracked_as_zero():
    a, b = client(50, 7), client(50, 7)  # identical sets
    merged = merge_sparse([(a, 1.0), (b, 3.0)], 50)
    np.testing.assert_allclose(flat(merged), flat(a), rtol=1e-6)
    lone = merge_sparse([(a, 1.0), (SparseModel.empty("mlp-90k", 3), 3.0)], 50)
    np.testing.assert_allclose(flat(lone), flat(a) / 4, rtol=1e-6)


def test_order_of_updates_does_not_change_the_tracked_set():
    ups = [(client(700, s), float(s + 1)) for s in range(4)]
    a, b = merge_sparse(ups, 1500), merge_sparse(ups[::-1], 1500)
    assert np.array_equal(a.flat_positions(), b.flat_positions())
    np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6)


def test_bad_inputs():
    with pytest.raises(ConfigError):
        merge_sparse([], 10)
    with pytest.raises(WireFormatError, match="seed"):
        merge_sparse([(client(10, 1, model_seed=1), 1.0), (client(10, 2, model_seed=2), 1.0)], 10)
    with pytest.raises(ConfigError, match="weights"):
        merge_sparse([(client(10, 1), 0.0)], 10)
    with pytest.raises(ConfigError, match="weights"):
        merge_sparse([(client(10, 1), float("nan"))], 10)


def test_churn():
    a = client(100, 1)
    assert churn(a, a) == 0.0
    assert churn(SparseModel.empty("mlp-90k", 3), a) == 1.0
    assert churn(a, SparseModel.empty("mlp-90k", 3)) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    ks=st.lists(st.integers(0, 400), min_size=1, max_size=5),
    big_k=st.integers(0, 1500),
    seed=st.integers(0, 1000),
)
def test_property_matches_reference(ks, big_k, seed):
    updates = [(client(k, seed + i), float(i + 1)) for i, k in enumerate(ks)]
    merged = merge_sparse(updates, big_k)
    np.testing.assert_allclose(
        flat(merged), dense_reference(updates, big_k).astype(np.float32), rtol=1e-6, atol=1e-12
    )


def _poisoned(seed=0):
    """8 honest clients near a common delta on the same 500 weights, 2 attackers pushing 1000x."""
    rng = np.random.default_rng(seed)
    base = client(500, 42)
    honest, attackers = [], []
    for i in range(10):
        tensors = []
        for t in base.tensors:
            noise = rng.standard_normal(t.count).astype(np.float32) * 0.05
            values = t.values * (1000.0 if i >= 8 else 1.0) + noise
            tensors.append(type(t)(t.name, t.shape, t.indices, values.astype(np.float32)))
        model = SparseModel(base.seed, base.model_id, tuple(tensors))
        (attackers if i >= 8 else honest).append((model, 100.0))
    return base, honest, attackers


@pytest.mark.parametrize(("rule", "clip"), [("median", None), ("trimmed-mean", None), ("mean", 1.0)])
def test_robust_rules_keep_poisoning_clients_from_moving_the_model(rule, clip):
    base, honest, attackers = _poisoned()
    truth = flat(base)
    plain = flat(merge_sparse(honest + attackers, 500))
    robust = flat(merge_sparse(honest + attackers, 500, rule=rule, trim=0.2, clip_norm=clip))
    clean = flat(merge_sparse(honest, 500, rule=rule, trim=0.2, clip_norm=clip))
    assert np.linalg.norm(plain - truth) > 100 * np.linalg.norm(truth)  # the plain mean is hijacked
    assert np.linalg.norm(robust - clean) < 0.5 * np.linalg.norm(clean) + 0.5  # robust barely moves


def test_robust_rules_equal_the_mean_when_clients_agree():
    a = client(300, 5)
    for rule in ("median", "trimmed-mean"):
        np.testing.assert_allclose(
            flat(merge_sparse([(a, 1.0), (a, 2.0), (a, 3.0)], 300, rule=rule)), flat(a), rtol=1e-6
        )


def test_median_and_trimmed_mean_per_coordinate():
    def one(v):
        return sparse_from_dense_delta(
            "mlp-90k",
            3,
            {
                **{n: np.zeros(s, np.float32) for n, s in SHAPES.items()},
                "5.bias": np.array([v] + [0] * 9, np.float32),
            },
        )

    ups = [(one(v), 1.0) for v in (1.0, 2.0, 3.0, 100.0)]
    assert flat(merge_sparse(ups, 10, rule="median"))[-10] == pytest.approx(2.5)
    assert flat(merge_sparse(ups, 10, rule="trimmed-mean", trim=0.25))[-10] == pytest.approx(2.5)
    assert flat(merge_sparse(ups, 10))[-10] == pytest.approx(26.5)
    with pytest.raises(ConfigError):
        merge_sparse(ups, 10, rule="krum")
    with pytest.raises(ConfigError):
        merge_sparse(ups, 10, trim=0.5)


def tracked_mean_reference(updates, big_k):
    sums, weights = np.zeros(N), np.zeros(N)
    for m, w in updates:
        d = flat(m).astype(np.float64)
        sums += d * w
        weights += (d != 0) * w
    return keep_top(np.divide(sums, weights, out=np.zeros(N), where=weights > 0), big_k)


@pytest.mark.parametrize("big_k", [500, 3000, 20_000])
def test_tracked_mean_matches_dense_reference(big_k):
    updates = [(client(1000, 1), 10.0), (client(2500, 2), 30.0), (client(600, 3), 5.0)]
    merged = merge_sparse(updates, big_k, rule="tracked-mean")
    merged.validate()
    want = tracked_mean_reference(updates, big_k)
    np.testing.assert_allclose(flat(merged), want.astype(np.float32), rtol=1e-6)


def test_tracked_mean_does_not_shrink_a_weight_one_device_tracks():
    a = client(50, 7)
    lone = merge_sparse([(a, 1.0), (SparseModel.empty("mlp-90k", 3), 3.0)], 50, rule="tracked-mean")
    np.testing.assert_allclose(flat(lone), flat(a), rtol=1e-6)


def test_models_outside_the_registry_merge_by_their_own_shapes():
    """The aggregation benchmark merges synthetic models of up to 10M weights."""
    from dropfleet.common.model.sparse import SparseTensor

    def synthetic(indices, values):
        t = SparseTensor("w", (1_000,), np.array(indices, np.int64), np.array(values, np.float32))
        return SparseModel(
            seed=0, model_id="synthetic", tensors=(t, SparseTensor("b", (3,), *[np.zeros(0)] * 2))
        )

    merged = merge_sparse([(synthetic([1, 5], [1.0, 2.0]), 1.0), (synthetic([5, 999], [4.0, 3.0]), 1.0)], 2)
    assert merged.tensors[0].indices.tolist() == [5, 999] and merged.tensors[0].values.tolist() == [3.0, 1.5]
