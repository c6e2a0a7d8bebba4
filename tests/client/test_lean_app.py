"""The ClientApp on the lean runtime: a round on real Flower messages in a process where torch cannot load."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dropfleet.common.device.data_files import read_fashion_mnist

CODE = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any import of torch, however deep or lazy, fails
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from dropfleet.client.app import evaluate_global, train
    from dropfleet.common.model.sparse import SparseModel
    from dropfleet.common.wire.codec import decode
    from dropfleet.fleet.records import DENSE_RECORD, SPARSE_RECORD, pack_sparse, sparse_payload

    data_dir, profile, strategy = sys.argv[1:]
    node = {"partition-id": 0, "num-partitions": 1, "profile": profile, "runtime": "lean"}
    node["data-dir"] = data_dir
    run = {"strategy": strategy, "model-id": "mlp-90k", "local-epochs": 1}
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=run)
    out = {}
    for kind, handler in (("train", train), ("evaluate", evaluate_global)):
        # Flower stamps messages with the running task's ids: the server's, then this node's.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        msg = Message(
            content=RecordDict({
                SPARSE_RECORD: pack_sparse(SparseModel.empty("mlp-90k", 0), "fp16"),
                "config": ConfigRecord({"server-round": 1}),
            } if strategy != "fedavg" else {DENSE_RECORD: ArrayRecord(), "config": ConfigRecord()}),
            dst_node_id=5,
            message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE,
        )
        TaskIdentity.node_id = 5
        reply = handler(msg, ctx)
        if reply.has_error():
            out[kind] = {"error": reply.error.reason}
            continue
        metrics = dict(reply.content.metric_records["metrics"])
        if kind == "train":
            metrics["tracked"] = decode(sparse_payload(reply.content)).num_tracked
            metrics["trainer"] = reply.content.config_records["device"]["trainer"]
        out[kind] = metrics
    out["torch"] = "torch" in sys.modules and sys.modules["torch"] is not None
    out["hwm"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def board_data(tmp_path_factory):
    """A board's own data: 1,200 real Fashion-MNIST images as train.npz."""
    root = tmp_path_factory.mktemp("board")
    images, labels = read_fashion_mnist("train", indices=np.arange(1200))
    np.savez(root / "train.npz", images=images, labels=labels)
    return root


def lean_round(data_dir, profile: str, strategy: str = "dropback") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CODE, str(data_dir), profile, strategy],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("profile, trainer", [("pi4-4g", "dense"), ("pi-zero-512m", "streaming")])
def test_a_lean_board_trains_and_evaluates_without_torch(board_data, profile, trainer):
    out = lean_round(board_data, profile)
    assert not out["torch"]
    train, evaluation = out["train"], out["evaluate"]
    assert "error" not in train, train
    assert train["trainer"] == trainer and 0 < train["tracked"] <= train["k"]
    assert train["num-examples"] == 1200 - 120  # the train split of the board's own data
    # What the model state costs: kept between steps, and the first step's measured peak.
    assert 0 < train["state-bytes"] < train["peak-bytes"] <= train["budget-bytes"]
    assert "error" not in evaluation and evaluation["num-examples"] == 120
    assert 0.0 <= evaluation["eval-accuracy"] <= 1.0
    # A measured bound, not a target: the whole process, Flower and numba included, peaked at
    # 192 MiB here (a torch ClientApp: ~500 MiB).
    assert out["hwm"] < 256 * 2**20, out["hwm"]


def test_a_lean_board_refuses_a_baseline_that_needs_torch(board_data):
    out = lean_round(board_data, "pi4-4g", "fedavg")
    assert "strategy 'fedavg' trains with torch; this node runs lean" in out["train"]["error"]
