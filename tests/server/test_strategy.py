"""The sparse strategy on real Flower messages: validation, merge, hostile replies."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict
from rich.console import Console

from dropfleet.common.aggregate.merge import merge_sparse
from dropfleet.common.errors import RunFailedError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import decode, encode
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import SPARSE_RECORD, pack_sparse, record_payload
from dropfleet.fleet.replies import UNAVAILABLE
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies import SparseDropBack
from tests.server.messages import ScriptedGrid, content, model, raw_record, reply, round_of

N = 89_610
CONFIG = RunConfig(strategy="dropback", global_k=3000, value_precision="fp32")


@pytest.fixture(autouse=True)
def _identity(task_identity):
    yield


def strategy():
    out = io.StringIO()
    return SparseDropBack(CONFIG, RoundRecorder("dropback", 3, None, Console(file=out))), out


def test_merges_good_replies_like_the_reference():
    s, _ = strategy()
    good = [(node, model(2000, node)) for node in (11, 12, 13)]
    trained = s.aggregate_train(1, [reply(n, content(m, examples=100 * n)) for n, m in good])
    published = decode(record_payload(trained.arrays))
    want = merge_sparse([(m, 100.0 * n) for n, m in good], CONFIG.global_k_count)
    assert published.num_tracked == want.num_tracked == 3000
    for a, b in zip(published.tensors, want.tensors, strict=True):
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.values, b.values)
    assert trained.train_loss == pytest.approx(0.5)
    stats = round_of(1, trained)
    assert stats.replied == 3 and stats.rejected == 0 and stats.global_tracked == 3000
    assert stats.bytes_up == sum(len(encode(m)) for _, m in good)


def test_server_momentum_publishes_the_reference_step_over_rounds():
    from dropfleet.common.aggregate.merge import combine, top_k
    from dropfleet.common.aggregate.server_opt import ServerMomentum
    from dropfleet.common.model.sparse import from_positions

    config = RunConfig(
        strategy="dropback",
        global_k=3000,
        value_precision="fp32",
        aggregation="tracked-mean",
        server_momentum=0.5,
    )
    s = SparseDropBack(config, RoundRecorder("dropback", 3, None, Console(file=io.StringIO())))
    reference = ServerMomentum(N, 0.5, 1.0)
    published = SparseModel.empty(config.model_id, config.seed)
    for r in (1, 2, 3):
        good = [(node, model(2000, 10 * r + node)) for node in (11, 12, 13)]
        replies = [reply(n, content(m, examples=100 * n), server_round=r) for n, m in good]
        arrays = s.aggregate_train(r, replies).arrays
        merged = combine([(m, 100.0 * n) for n, m in good], rule="tracked-mean")
        flat_values = np.concatenate([t.values for t in published.tensors])
        step = reference.step((published.flat_positions(), flat_values), merged)
        published = from_positions(published, *top_k(*step, 3000))
        got = decode(record_payload(arrays))
        assert np.array_equal(got.flat_positions(), published.flat_positions())
        for a, b in zip(got.tensors, published.tensors, strict=True):
            assert np.array_equal(a.values, b.values)


def test_change_coded_replies_resolve_against_the_global_sent_and_stale_ones_are_rejected():
    from dropfleet.common.wire.uplink import encode_change, resolve

    config = RunConfig(
        strategy="dropback",
        global_k=3000,
        value_precision="fp32",
        uplink_coding="change",
        uplink_precision="int8",
    )
    s = SparseDropBack(config, RoundRecorder("dropback", 3, None, Console(file=io.StringIO())))
    sent = s.global_model
    good = [(node, encode_change(model(2000, node), sent, 1, "int8")[0]) for node in (11, 12, 13)]
    stale = encode_change(model(2000, 14), sent, 2, "int8")[0]
    replies = [reply(n, content(raw_record(p), examples=100 * n)) for n, p in good]
    trained = s.aggregate_train(1, [*replies, reply(14, content(raw_record(stale)))])
    arrays = trained.arrays
    want = merge_sparse([(resolve(decode(p), sent, 1), 100.0 * n) for n, p in good], 3000)
    got = decode(record_payload(arrays))
    assert np.array_equal(got.flat_positions(), want.flat_positions())
    for a, b in zip(got.tensors, want.tensors, strict=True):
        assert np.array_equal(a.values, b.values)
    stats = round_of(1, trained)
    assert stats.replied == 3 and stats.rejected == 1
    assert any("global version 2, but this round sent version 1" in f for f in stats.failures)


def hostile_replies():
    ok = model(500, 99)
    nan_bytes = bytearray(encode(ok))
    first = next(t for t in ok.tensors if t.count)
    # Corrupt the first fp32 value of the first non-empty tensor into a NaN.
    pos = bytes(nan_bytes).find(first.values[:1].tobytes())
    nan_bytes[pos : pos + 4] = np.array([np.nan], "<f4").tobytes()
    return {
        "wrong seed": content(model(500, 1, model_seed=CONFIG.seed + 1)),
        "NaN value": content(raw_record(bytes(nan_bytes))),
        "truncated": content(raw_record(encode(ok)[:-7])),
        "garbage": content(raw_record(b"\x08\x01" * 40)),
        "more than k": content(model(2500, 2), k=2000),
        "zero examples": content(model(500, 3), examples=0),
        "absurd examples": content(model(500, 4), examples=10**9),
        "fractional examples": content(model(500, 5), examples=12.5),
        "no k": RecordDict(
            {
                SPARSE_RECORD: pack_sparse(model(500, 6), "fp32"),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            }
        ),
        "dense arrays": RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                "metrics": MetricRecord({"num-examples": 10, "k": 5}),
            }
        ),
        "wrong model": content(pack_sparse(_other_model(), "fp32")),
    }


def _other_model():
    return SparseModel.empty("lenet-300-100", CONFIG.seed)


def test_hostile_replies_are_rejected_counted_and_change_nothing():
    good = [reply(n, content(model(2000, n), examples=100 * n)) for n in (11, 12, 13)]
    clean, _ = strategy()
    clean_arrays = clean.aggregate_train(1, good).arrays
    hostile = hostile_replies()
    bad = [reply(100 + i, c) for i, c in enumerate(hostile.values())]
    errors = [reply(200, error=Error(code=4001, reason="budget too small"))]
    s, _ = strategy()
    trained = s.aggregate_train(1, bad[:5] + good + bad[5:] + errors)
    assert record_payload(trained.arrays) == record_payload(clean_arrays)  # bit-identical model
    stats = round_of(1, trained)
    assert stats.rejected == len(hostile) and stats.failed == 1 and stats.replied == 3
    reasons = " | ".join(stats.failures)
    for needle in (
        "seed",
        "NaN",
        "undecodable",
        "declared k",
        "num-examples",
        "lacks metric 'k'",
        "expected exactly ArrayRecord(s)",
        "model id",
        "budget too small",
    ):
        assert needle in reasons, needle


def test_too_few_answers_keep_the_model_then_fail_the_run_with_a_reason(fmnist_test):
    from dropfleet.server.strategies import Evaluation

    small = fmnist_test.subset(np.arange(200))
    s = SparseDropBack(
        CONFIG,
        RoundRecorder("dropback", 3, None, Console(file=io.StringIO())),
        Evaluation(small, lambda: small),
    )
    # Node 12 never answers; node 11 alone is below min-train-nodes 2.
    grid = ScriptedGrid([11, 12], lambda node, m: content(model(2000, 11)) if node == 11 else None)
    arrays = s.initial_arrays()
    for r in (1, 2):
        assert s.play_round(grid, r, arrays) is arrays  # the global model is unchanged
    assert s.global_model.num_tracked == 0 and s.short_rounds == 2
    assert [h.replied for h in s.recorder.history] == [1, 1]  # each short round still published
    with pytest.raises(
        RunFailedError,
        match=r"3 rounds in a row had fewer than 2 acceptable replies \(last: 1 of 2 sampled\)",
    ):
        s.play_round(grid, 3, arrays)
    assert len(s.recorder.history) == 2  # the failing round is not published


def test_only_bad_replies_keep_the_global_model():
    s, _ = strategy()
    before = s.initial_arrays()
    trained = s.aggregate_train(1, [reply(5, c) for c in hostile_replies().values()])
    assert trained.arrays is None and trained.train_loss is None and trained.short
    assert s.global_model.num_tracked == 0 and record_payload(before) == record_payload(s.initial_arrays())


def test_initial_model_is_just_the_seed():
    s, _ = strategy()
    initial = decode(record_payload(s.initial_arrays()))
    assert initial.num_tracked == 0 and initial.seed == CONFIG.seed
    assert len(record_payload(s.initial_arrays())) < 200  # no dense tensor, just a seed and names


def test_the_strategy_publishes_each_round_once_with_the_model_it_holds(tmp_path, fmnist_test):
    """The whole loop on a scripted fleet: configure, collect, aggregate, publish, round by round."""
    from flwr.app import MessageType

    from dropfleet.server.store import Store
    from dropfleet.server.strategies import Evaluation

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.start_run("5", "dropback", "mlp-90k", CONFIG.seed, 2, {})
    recorder = RoundRecorder("dropback", 2, None, Console(file=io.StringIO()), store=store, run_id="5")
    small = fmnist_test.subset(np.arange(500))
    config = CONFIG.model_copy(update={"num_server_rounds": 2, "fraction_evaluate": 1.0})
    s = SparseDropBack(config, recorder, Evaluation(small, lambda: small))
    evaluation = {"num-examples": 50, "eval-loss": 0.7, "eval-accuracy": 0.6}

    def answer(node, instruction):
        if instruction.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord(evaluation)})
        server_round = instruction.content["config"]["server-round"]
        return content(model(2000, 10 * server_round + node))

    grid = ScriptedGrid([11, 12], answer)
    s.run(grid)
    assert store.model_rounds("5") == [0, 1, 2]
    assert store.model("5", 2)["data"] == s.payload  # what devices received
    rounds = store.rounds("5")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["replied"] == 2 and rounds[1]["accuracy"] is not None
    assert rounds[2]["fed_accuracy"] == pytest.approx(0.6)
    sent = [m for m in grid.sent if m.metadata.group_id == "2"]  # 2 train, 2 evaluate instructions
    assert rounds[2]["bytes_down"] == sum(
        len(m.content.array_records[SPARSE_RECORD]["model"].data) for m in sent
    )
    assert len(sent) == 4 and {m.metadata.group_id for m in grid.sent} == {"1", "2"}


def test_update_memory_replays_a_missing_node_and_forgets_a_refused_one():
    from dropfleet.common.aggregate.merge import next_global
    from dropfleet.common.model.sparse import from_positions

    config = RunConfig(
        strategy="dropback",
        global_k=3000,
        value_precision="fp32",
        aggregation="tracked-mean",
        update_memory_rounds=5,
    )
    s = SparseDropBack(config, RoundRecorder("dropback", 4, None, Console(file=io.StringIO())))
    first = {n: model(2000, n) for n in (11, 12, 13)}
    s.aggregate_train(1, [reply(n, content(m, examples=100 * n)) for n, m in first.items()])

    # Round 2: node 13 sits out (its error reply says so); its round-1 change (against the bare
    # seed) is replayed on g2.
    g2 = s.global_model
    second = {n: model(2000, 20 + n) for n in (11, 12)}
    away = reply(13, error=Error(code=UNAVAILABLE, reason="unavailable this round"), server_round=2)
    trained = s.aggregate_train(
        2, [reply(n, content(m, examples=100 * n), server_round=2) for n, m in second.items()] + [away]
    )
    now = np.zeros(N)
    now[g2.flat_positions()] = g2.flat_values()
    pos = first[13].flat_positions()
    replayed = from_positions(g2, pos, now[pos] + first[13].flat_values())
    want = next_global(
        g2,
        [(m, 100.0 * n) for n, m in second.items()] + [(replayed, 1300.0)],
        3000,
        rule="tracked-mean",
    )
    without = next_global(g2, [(m, 100.0 * n) for n, m in second.items()], 3000, rule="tracked-mean")
    assert np.array_equal(s.global_model.flat_positions(), want.flat_positions())
    assert np.array_equal(s.global_model.flat_values(), want.flat_values())
    assert not np.array_equal(want.flat_positions(), without.flat_positions())
    assert round_of(2, trained).replayed == 1  # in the round's record (JSON lines, store, REST)

    # Round 3: node 13 replies with garbage: refused, and its kept update with it.
    g3 = s.global_model
    third = {n: model(2000, 30 + n) for n in (11, 12)}
    bad = reply(13, content(raw_record(b"\x08\x01" * 40)), server_round=3)
    trained = s.aggregate_train(
        3, [reply(n, content(m, examples=100 * n), server_round=3) for n, m in third.items()] + [bad]
    )
    fresh_only = next_global(g3, [(m, 100.0 * n) for n, m in third.items()], 3000, rule="tracked-mean")
    assert np.array_equal(s.global_model.flat_positions(), fresh_only.flat_positions())
    assert np.array_equal(s.global_model.flat_values(), fresh_only.flat_values())
    assert round_of(3, trained).replayed == 0
