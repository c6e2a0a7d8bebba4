"""Resume checkpoints: what a restarted ServerApp reads back, and the fence against the old one."""

from dataclasses import replace

import pytest

from dropfleet.common.errors import ConfigError, StaleWriterError
from dropfleet.common.wire.codec import encode
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import record_payload
from dropfleet.server.checkpoint import resume
from dropfleet.server.reporting import RoundRecorder, RoundStats
from dropfleet.server.store import Store
from dropfleet.server.strategies import SparseDropBack
from tests.factories import random_sparse_model

ROUNDS = 4


def started_store(url: str, replied: list[int], seed: int = 0) -> tuple[Store, list[bytes]]:
    """Run "7" owned by Flower run "7", with rounds 0..len(replied)-1 published."""
    store = Store(url)
    store.migrate()
    store.start_run("7", "dropback", "mlp-90k", seed, ROUNDS, {"seed": seed}, attempt="7")
    payloads = []
    for r, n in enumerate(replied):
        payloads.append(encode(random_sparse_model(50 + r, seed=r, model_seed=seed), "fp16"))
        store.publish_round("7", r, {"accuracy": 0.1 * r, "replied": n}, payloads[-1], 50 + r, attempt="7")
    return store, payloads


def config(**overrides: object) -> RunConfig:
    return RunConfig(
        **{
            "strategy": "dropback",
            "resume_run": "7",
            "num_server_rounds": ROUNDS,
            "min_train_nodes": 2,
            **overrides,
        }
    )


def test_resume_reads_the_last_published_round_and_fences_the_old_attempt(store_url):
    store, payloads = started_store(store_url, [0, 2, 2])
    ckpt = resume(store, config(), attempt="8")
    assert (ckpt.run_id, ckpt.round, ckpt.short_rounds) == ("7", 2, 0)
    assert ckpt.payload == payloads[2] and encode(ckpt.model, "fp16") == payloads[2]
    run = store.get_run("7")
    assert (run["attempt"], run["resumes"], run["status"]) == ("8", 1, "running")

    # The old ServerApp, if it still runs, can neither publish nor close the run.
    with pytest.raises(StaleWriterError, match="owned by Flower run 8"):
        store.publish_round("7", 3, {"accuracy": 0.9}, b"stale", 1, attempt="7")
    store.finish_run("7", "failed", "killed", attempt="7")
    assert [r["round"] for r in store.rounds("7")] == [0, 1, 2]
    assert store.model_rounds("7") == [0, 1, 2]
    assert store.get_run("7")["status"] == "running"

    store.publish_round("7", 3, {"accuracy": 0.9}, payloads[0], 50, attempt="8")
    store.finish_run("7", "finished", attempt="8")
    assert [r["round"] for r in store.rounds("7")] == [0, 1, 2, 3]
    assert store.get_run("7")["status"] == "finished"


def test_the_short_round_count_is_read_back_from_the_history(store_url):
    store, _ = started_store(store_url, [0, 2, 1, 0])
    assert resume(store, config(num_server_rounds=6), attempt="8").short_rounds == 2


@pytest.mark.parametrize(
    ("replied", "overrides", "needle"),
    [
        ([0, 2], {"resume_run": "9"}, "no such run"),
        ([0, 2], {"seed": 1}, "seed=1"),
        ([0, 2], {"model_id": "lenet-300-100"}, "model-id='lenet-300-100'"),
        ([], {}, "published no round"),
        ([0, 2, 2, 2, 2], {}, "all 4 rounds are published"),
    ],
)
def test_a_refused_resume_changes_nothing(store_url, replied, overrides, needle):
    store, _ = started_store(store_url, replied)
    before = store.get_run("7")
    with pytest.raises(ConfigError, match=needle):
        resume(store, config(**overrides), attempt="8")
    assert store.get_run("7") == before


def test_a_finished_run_is_not_resumed(store_url):
    store, _ = started_store(store_url, [0, 2])
    store.finish_run("7", "finished", attempt="7")
    with pytest.raises(ConfigError, match="it has finished"):
        resume(store, config(), attempt="8")
    assert store.get_run("7")["attempt"] == "7"


def test_the_strategy_starts_from_the_checkpoint_bytes_and_round(store_url, tmp_path):
    store, payloads = started_store(store_url, [0, 2])
    ckpt = resume(store, config(), attempt="8")
    recorder = RoundRecorder("dropback", ROUNDS, None, store=store, run_id="7", attempt="8", resumed_after=1)
    try:
        strategy = SparseDropBack(config(), recorder, checkpoint=ckpt)
        assert record_payload(strategy.initial_arrays()) == payloads[1]  # not re-encoded
        assert strategy.round_offset == 1 and strategy.global_model == ckpt.model
    finally:
        recorder.close()


@pytest.mark.parametrize(
    "optimizer", [{"server_momentum": 0.7}, {"server_optimizer": "adam", "server_learning_rate": 0.1}]
)
def test_a_resumed_run_continues_the_server_optimizer_exactly(store_url, task_identity, optimizer):
    """Rounds 1-3 straight through, or 1-2 then a restart from the store: round 3 publishes the same bytes."""
    from tests.server.messages import content, model, reply, round_of

    settings = {"global_k": 3000, "value_precision": "fp32", "aggregation": "tracked-mean", **optimizer}

    def replies(r):
        return [
            reply(n, content(model(2000, 10 * r + n), examples=100 * n), server_round=r) for n in (11, 12)
        ]

    def run_rounds(strategy, rounds):
        out = []
        for r in rounds:
            trained = strategy.aggregate_train(r, replies(r))
            arrays = trained.arrays
            strategy.recorder.record(
                replace(round_of(r, trained), accuracy=0.5, loss=1.0),  # what publish adds: evaluation
                strategy.published_payload(arrays),
                strategy.published_state(),
            )
            out.append(record_payload(arrays))
        return out

    straight = Store(store_url)
    straight.migrate()
    straight.start_run("5", "dropback", "mlp-90k", 0, ROUNDS, {}, attempt="5")
    recorder = RoundRecorder("dropback", ROUNDS, None, store=straight, run_id="5", attempt="5")
    want = run_rounds(
        SparseDropBack(RunConfig(strategy="dropback", num_server_rounds=ROUNDS, **settings), recorder),
        (1, 2, 3),
    )
    recorder.close()

    store = Store(store_url)
    store.start_run("6", "dropback", "mlp-90k", 0, ROUNDS, {}, attempt="6")
    first = RoundRecorder("dropback", ROUNDS, None, store=store, run_id="6", attempt="6")
    first.record(RoundStats(round=0, strategy="dropback", accuracy=0.1, loss=2.3))  # as the loop does
    assert (
        run_rounds(
            SparseDropBack(RunConfig(strategy="dropback", num_server_rounds=ROUNDS, **settings), first),
            (1, 2),
        )
        == want[:2]
    )
    first.close()
    resumed_config = RunConfig(strategy="dropback", num_server_rounds=ROUNDS, resume_run="6", **settings)
    ckpt = resume(store, resumed_config, attempt="9")
    assert ckpt.round == 2 and ckpt.server_state is not None
    second = RoundRecorder("dropback", ROUNDS, None, store=store, run_id="6", attempt="9", resumed_after=2)
    assert run_rounds(SparseDropBack(resumed_config, second, checkpoint=ckpt), (3,)) == want[2:]
    second.close()
