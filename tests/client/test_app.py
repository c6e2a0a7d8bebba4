"""The ClientApp's handlers on real Flower messages and contexts (no processes needed)."""

import gzip

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from dropfleet.client.app import train
from dropfleet.client.baselines import TOPK_META
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import decode, encode
from dropfleet.fleet.records import SPARSE_RECORD, TOPK_RECORD, pack_sparse, pack_topk_update, sparse_payload
from dropfleet.fleet.replies import BAD_REQUEST
from tests.factories import random_sparse_model

RUN_CONFIG = {"train-subset": 200, "partitioner": "iid"}


def instruction(record_name: str, record, server_round: int, identity) -> Message:
    identity.node_id = 0
    return Message(
        content=RecordDict({record_name: record, "config": ConfigRecord({"server-round": server_round})}),
        dst_node_id=5,
        message_type=MessageType.TRAIN,
    )


def context(run_config: dict[str, object] | None = None, **node_config: object) -> Context:
    node = {"partition-id": 0, "num-partitions": 10, "profile": "pi-zero-512m", **node_config}
    run = {**RUN_CONFIG, **(run_config or {})}
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=run)


def run(msg: Message, ctx: Context, identity) -> Message:
    identity.node_id = 5
    return train(msg, ctx)


def test_a_node_reports_its_trainer_and_measured_peak_within_its_budget(task_identity):
    start = pack_sparse(random_sparse_model(2000, seed=3), "fp16")
    replies = {
        (profile, mode): run(
            instruction(SPARSE_RECORD, start, 1, task_identity),
            context(profile=profile, streaming=mode),
            task_identity,
        )
        for profile, mode in (("pi4-4g", False), ("pi4-4g", True), ("pi-zero-512m", False))
    }
    trainers = {key: r.content.config_records["device"]["trainer"] for key, r in replies.items()}
    assert list(trainers.values()) == ["dense", "streaming", "streaming"]  # pi-zero streams by its budget
    for reply in replies.values():
        metrics = reply.content.metric_records["metrics"]
        assert 0 < metrics["state-bytes"] < metrics["peak-bytes"] <= metrics["budget-bytes"]
    dense, streamed = (replies["pi4-4g", m].content.metric_records["metrics"] for m in (False, True))
    assert dense["state-bytes"] == 64 + 12 * dense["k"] and streamed["state-bytes"] == 8 * streamed["k"]
    assert decode(sparse_payload(replies["pi4-4g", True].content)).num_tracked <= streamed["k"]


def test_a_topk_node_keeps_its_model_and_refuses_an_update_it_cannot_apply(task_identity):
    ctx = context({"strategy": "topk-ef"})
    empty = encode(SparseModel.empty("mlp-90k", 0), "fp16")
    first = run(instruction(TOPK_RECORD, pack_topk_update(empty, 0), 1, task_identity), ctx, task_identity)
    sent = decode(sparse_payload(first.content))
    assert 0 < sent.num_tracked <= first.content.metric_records["metrics"]["k"]
    assert ctx.state[TOPK_META]["version"] == 0
    update = encode(random_sparse_model(500, seed=9), "fp16")
    second = run(instruction(TOPK_RECORD, pack_topk_update(update, 1), 2, task_identity), ctx, task_identity)
    assert not second.has_error() and ctx.state[TOPK_META]["version"] == 1
    stale = run(instruction(TOPK_RECORD, pack_topk_update(update, 5), 3, task_identity), ctx, task_identity)
    assert stale.has_error() and "out of sync" in stale.error.reason
    assert ctx.state[TOPK_META]["version"] == 1  # refused: nothing changed


def test_a_node_trains_what_the_runs_strategy_sends_and_refuses_anything_else(task_identity):
    """The run's `strategy` picks the trainer (fleet/strategies.py), not the record that arrived."""
    empty = encode(SparseModel.empty("mlp-90k", 0), "fp16")
    topk = instruction(TOPK_RECORD, pack_topk_update(empty, 0), 1, task_identity)
    seed_only = pack_sparse(SparseModel.empty("mlp-90k", 0), "fp16")
    sparse = instruction(SPARSE_RECORD, seed_only, 1, task_identity)
    for msg, strategy in ((topk, "dropback"), (sparse, "topk-ef"), (sparse, "fedavg")):
        ctx = context({"strategy": strategy})
        reply = run(msg, ctx, task_identity)
        assert reply.has_error() and reply.error.code == BAD_REQUEST, strategy
        assert f"strategy {strategy!r} sends one of" in reply.error.reason
        assert TOPK_META not in ctx.state  # nothing trained, nothing kept


def test_a_malformed_streaming_switch_is_refused(task_identity):
    start = pack_sparse(random_sparse_model(100, seed=1), "fp16")
    reply = run(
        instruction(SPARSE_RECORD, start, 1, task_identity), context(streaming="false"), task_identity
    )
    assert reply.has_error() and "'streaming' must be true or false" in reply.error.reason


def _idx(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file, as Fashion-MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_a_device_trains_a_round_on_its_own_data(task_identity, tmp_path):
    """Node config data-dir: a generated data set as train.npz, and as IDX files; bad data is refused."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8), rng.integers(0, 10, 120)
    npz_dir, idx_dir, bad_dir = tmp_path / "npz", tmp_path / "idx", tmp_path / "bad"
    for d in (npz_dir, idx_dir, bad_dir):
        d.mkdir()
    np.savez(npz_dir / "train.npz", images=images, labels=labels)
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images[:50])))
    (idx_dir / "train-labels-idx1-ubyte").write_bytes(_idx(labels[:50]))
    np.savez(bad_dir / "train.npz", images=images, labels=labels + 10)
    start = pack_sparse(SparseModel.empty("mlp-90k", 0), "fp16")
    for data_dir, examples in ((npz_dir, 108), (idx_dir, 45)):  # 10% of each is held out
        reply = run(
            instruction(SPARSE_RECORD, start, 1, task_identity),
            context(**{"data-dir": str(data_dir)}),
            task_identity,
        )
        assert not reply.has_error(), reply.error.reason
        assert reply.content.metric_records["metrics"]["num-examples"] == examples
        assert decode(sparse_payload(reply.content)).num_tracked > 0  # it trained
    refused = run(
        instruction(SPARSE_RECORD, start, 1, task_identity),
        context(**{"data-dir": str(bad_dir)}),
        task_identity,
    )
    assert refused.has_error() and "labels must be in [0, 10)" in refused.error.reason
