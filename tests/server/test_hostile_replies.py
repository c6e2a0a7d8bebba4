"""No reply can stop a round: each hostile shape is rejected with a reason, the model is unchanged.

Every case sits beside three good replies; the published model must be
bit-identical to the one the good replies alone give.
"""

import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from dropfleet.common.model.torch_model import seeded_model
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import DENSE_RECORD, SPARSE_RECORD, pack_sparse, record_payload
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies import DenseFedAvg, SparseDropBack, TopKFedAvg
from dropfleet.server.validation import allowed_k
from tests.factories import N_MLP
from tests.server.messages import content, model, raw_record, reply, round_of, with_value

FP32 = RunConfig(strategy="dropback", global_k=3000, value_precision="fp32")
FP16 = RunConfig(strategy="dropback", global_k=3000, value_precision="fp16")
GOOD_NODES = (11, 12, 13)


@pytest.fixture(autouse=True)
def _identity(task_identity):
    yield


def sparse_strategy(config=FP32):
    return SparseDropBack(config, RoundRecorder("dropback", 3, None, Console(file=io.StringIO())))


def good(precision="fp32"):
    return [reply(n, content(model(2000, n), examples=100 * n, precision=precision)) for n in GOOD_NODES]


def published(strategy, replies, server_round=1):
    """The model the round publishes, and the round's stats."""
    trained = strategy.aggregate_train(server_round, replies)
    return record_payload(trained.arrays), round_of(server_round, trained)


def hostile_cases():
    """Replies that, before, either failed the run or were accepted though they should not be."""
    k_n = content(model(2000, 40), k=N_MLP)
    k_huge = content(model(2000, 41), k=10**15)
    extra_first = RecordDict(
        {
            SPARSE_RECORD: pack_sparse(model(500, 42), "fp32"),
            "aaa": MetricRecord({"num-examples": 0}),  # Flower weighs by the first MetricRecord
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5, "k": 2000}),
        }
    )
    return {
        "1e30 value": (FP32, content(with_value(model(500, 30), 1e30))),
        "7e4 fp32 value in an fp16 run, many examples": (
            FP16,
            content(with_value(model(500, 31), 7e4), examples=100_000, precision="fp32"),
        ),
        "list where a number belongs": (FP32, content(model(500, 32), **{"train-loss": [0.1, 0.2]})),
        "float k": (FP32, content(model(500, 33), k=2000.0)),
        "NaN loss": (FP32, content(model(500, 34), **{"train-loss": math.nan})),
        "extra MetricRecord before metrics": (FP32, extra_first),
        "unknown metric": (FP32, content(model(500, 35), surprise=1)),
        "k = N": (FP32, k_n),
        "k = 10^15": (FP32, k_huge),
        "device record of the wrong type": (
            FP32,
            RecordDict(
                {
                    SPARSE_RECORD: pack_sparse(model(500, 36), "fp32"),
                    "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5, "k": 2000}),
                    "device": ConfigRecord({"profile": b"\x00" * 10}),
                }
            ),
        ),
        "unknown trainer": (
            FP32,
            RecordDict(
                {
                    SPARSE_RECORD: pack_sparse(model(500, 38), "fp32"),
                    "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5, "k": 2000}),
                    "device": ConfigRecord({"trainer": "gpu-cluster"}),
                }
            ),
        ),
        "negative peak": (FP32, content(model(500, 39), **{"peak-bytes": -1})),
        "negative board RSS": (FP32, content(model(500, 36), **{"board-rss-bytes": -1})),
        "fractional process RSS": (FP32, content(model(500, 35), **{"process-rss-bytes": 1.5})),
        "unexpected ConfigRecord": (
            FP32,
            RecordDict(
                {
                    SPARSE_RECORD: pack_sparse(model(500, 37), "fp32"),
                    "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5, "k": 2000}),
                    "config": ConfigRecord({"x": 1}),
                }
            ),
        ),
        "array of the wrong serialization type": (
            FP32,
            content(ArrayRecord({"model": Array(np.zeros(4, np.float32))})),
        ),
    }


@pytest.mark.parametrize("case", list(hostile_cases()))
def test_a_hostile_reply_is_rejected_and_changes_nothing(case):
    config, bad = hostile_cases()[case]
    precision = config.value_precision
    clean, _ = published(sparse_strategy(config), good(precision))
    payload, stats = published(sparse_strategy(config), [*good(precision), reply(99, bad)])
    assert payload == clean
    assert stats.rejected == 1 and stats.replied == 3
    assert "unreadable reply" not in stats.failures[0]  # a named rule refused it, not the safety net
    assert [e.node_id for e in stats.node_events if e.outcome == "rejected"] == [99]


def test_a_reply_to_another_round_and_repeated_replies_are_rejected():
    clean, _ = published(sparse_strategy(), good())
    stale = reply(21, content(model(2000, 21)), server_round=1)
    twice = [
        reply(22, content(model(2000, 22)), server_round=2),
        reply(22, content(model(2000, 23)), server_round=2),
    ]
    payload, stats = published(sparse_strategy(), [*good_round(2), stale, *twice], server_round=2)
    assert payload == clean
    reasons = " | ".join(stats.failures)
    assert "not the current round 2" in reasons and "more than one reply" in reasons


def good_round(server_round):
    return [
        reply(n, content(model(2000, n), examples=100 * n), server_round=server_round) for n in GOOD_NODES
    ]


def test_the_k_a_device_may_send_comes_from_the_profiles_or_max_k():
    assert 20_000 < allowed_k(FP32) < N_MLP  # jetson-8g's budget spent on k by streaming
    assert allowed_k(RunConfig(strategy="dropback", max_k=5000)) == 5000
    s = SparseDropBack(
        RunConfig(strategy="dropback", max_k=2000, global_k=3000, value_precision="fp32"),
        sparse_strategy().recorder,
    )
    trained = s.aggregate_train(1, [*good(), reply(50, content(model(2100, 50), k=2100))])
    assert "declared k 2100 > the 2000" in round_of(1, trained).failures[0]


def test_hostile_evaluation_replies_do_not_stop_the_round():
    s = sparse_strategy()

    def ev(node, metrics, **records):
        return reply(
            node,
            RecordDict({"metrics": MetricRecord(metrics), **records}),
            message_type=MessageType.EVALUATE,
        )

    ok = {"num-examples": 100, "eval-loss": 0.5, "eval-accuracy": 0.8}
    evaluated = s.aggregate_evaluate(
        1,
        [
            ev(1, ok),
            ev(2, {**ok, "num-examples": 300, "eval-accuracy": 0.4}),
            ev(3, {**ok, "eval-accuracy": 7.0}),
            ev(4, {**ok, "eval-loss": [1.0]}),
            ev(5, {"num-examples": 0, "eval-loss": 0.1, "eval-accuracy": 0.1}),
            ev(6, ok, aaa=MetricRecord({"num-examples": 0})),
        ],
    )
    assert evaluated.fed_accuracy == pytest.approx((0.8 * 100 + 0.4 * 300) / 400)
    stats = round_of(1, evaluated=evaluated)
    assert stats.fed_accuracy == pytest.approx(0.5) and stats.rejected == 0  # training's count only
    assert sorted(e.node_id for e in stats.node_events if e.outcome == "rejected") == [3, 4, 5, 6]


def _dense(node, examples, scale=0.0, **overrides):
    state = {n: t.numpy().copy() for n, t in seeded_model("mlp-90k", 0).state_dict().items()}
    rng = np.random.default_rng(node)
    state = {n: a + (rng.standard_normal(a.shape) * 0.01).astype(a.dtype) for n, a in state.items()}
    state.update(overrides)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.4})
    record = ArrayRecord({n: Array(a) for n, a in state.items()})
    return reply(node, RecordDict({DENSE_RECORD: record, "metrics": metrics}))


def test_hostile_dense_replies_leave_fedavg_unchanged():
    def strategy():
        return DenseFedAvg(FP32, RoundRecorder("fedavg", 3, None, Console(file=io.StringIO())))

    good_dense = [_dense(n, 100 * n) for n in GOOD_NODES]
    clean = strategy().aggregate_train(1, good_dense).arrays
    bad = [
        _dense(30, 100, **{"0.weight": np.full((100, 784), np.inf, np.float32)}),
        _dense(31, 100, **{"0.weight": np.zeros((3, 3), np.float32)}),
        _dense(32, 100, **{"extra": np.zeros(3, np.float32)}),
        _dense(33, 100, **{"0.weight": np.full((100, 784), 1e30, np.float32)}),
        reply(34, RecordDict({DENSE_RECORD: good_dense[0].content.array_records[DENSE_RECORD]})),
    ]
    s = strategy()
    trained = s.aggregate_train(1, [*bad, *good_dense])
    for name in clean:
        assert np.array_equal(trained.arrays[name].numpy(), clean[name].numpy())
    assert round_of(1, trained).rejected == len(bad) and trained.train_loss == pytest.approx(0.4)


def test_topk_baseline_rejects_hostile_replies_too():
    def strategy():
        return TopKFedAvg(FP32, RoundRecorder("topk-ef", 3, None, Console(file=io.StringIO())))

    clean = strategy().aggregate_train(1, good()).arrays
    s = strategy()
    bads = [reply(90 + i, c) for i, (_, c) in enumerate(hostile_cases().values())]
    trained = s.aggregate_train(1, [*bads, *good()])
    assert round_of(1, trained).rejected == len(bads)
    assert all(bytes(trained.arrays[n].data) == bytes(clean[n].data) for n in ("model", "version"))


# ----- property: arbitrary Flower reply records against the strategy -----------------------------

_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
_keys = st.sampled_from(
    [
        "num-examples",
        "train-loss",
        "k",
        "state-bytes",
        "peak-bytes",
        "budget-bytes",
        "process-rss-bytes",
        "x",
        "",
    ]
)
_metric_records = st.dictionaries(_keys, _scalars, max_size=6).map(MetricRecord)
_config_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.text(max_size=80), st.binary(max_size=8), st.booleans()
)
_config_records = st.dictionaries(
    st.sampled_from(["profile", "partition-id", "trainer", "x"]), _config_values, max_size=3
).map(ConfigRecord)
_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda k, seed: pack_sparse(model(k, seed), "fp32"), st.integers(0, 3000), st.integers(0, 99)),
)


@st.composite
def arbitrary_content(draw):
    records = {}
    for name in draw(
        st.lists(st.sampled_from(["sparse-model", "metrics", "device", "arrays", "x"]), max_size=4)
    ):
        kind = draw(st.sampled_from(["array", "metric", "config"]))
        if kind == "array":
            payload = draw(_payloads)
            records[name] = payload if isinstance(payload, ArrayRecord) else raw_record(payload)
        elif kind == "metric":
            records[name] = draw(_metric_records)
        else:
            records[name] = draw(_config_records)
    return RecordDict(records)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(arbitrary_content(), st.sampled_from([1, 1, 1, 2])), min_size=1, max_size=4))
def test_property_no_reply_shape_stops_a_round(extra):
    clean, _ = published(sparse_strategy(), good())
    replies = [reply(100 + i, c, server_round=r) for i, (c, r) in enumerate(extra)]
    trained = sparse_strategy().aggregate_train(1, [*replies, *good()])
    stats = round_of(1, trained)
    assert not any("unreadable reply" in f for f in stats.failures)  # every rejection by a named rule
    if stats.replied == 3:
        assert record_payload(trained.arrays) == clean
