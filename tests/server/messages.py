"""Real Flower reply messages for strategy tests (what a SuperNode would hand the ServerApp)."""

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from dropfleet.fleet.records import SPARSE_ARRAY, SPARSE_RECORD, SPARSE_STYPE, pack_sparse
from tests.factories import random_sparse_model


def node_contexts(nodes, run_config):
    """Fresh node contexts of pi4-4g devices 0..9 of a 10-way partition, as a SuperNode keeps them."""
    return {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={"partition-id": n, "num-partitions": 10, "profile": "pi4-4g"},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for n in nodes
    }


def model(k, seed, model_seed=0, scale=0.01):
    return random_sparse_model(k, seed, model_seed, scale)


def reply(node_id, content=None, error=None, server_round=1, message_type=MessageType.TRAIN):
    """A reply from `node_id` to an instruction of `server_round` (Flower copies the group id)."""
    ins = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": server_round})}),
        dst_node_id=node_id,
        message_type=message_type,
        group_id=str(server_round),
    )
    TaskIdentity.node_id = node_id
    try:
        if error is not None:
            return Message(error=error, reply_to=ins)
        return Message(content=content, reply_to=ins)
    finally:
        TaskIdentity.node_id = 0


def content(sparse_or_record, examples=100, k=2000, precision="fp32", **extra_metrics):
    record = (
        sparse_or_record
        if isinstance(sparse_or_record, ArrayRecord)
        else pack_sparse(sparse_or_record, precision)
    )
    metrics = {"num-examples": examples, "train-loss": 0.5, "k": k, **extra_metrics}
    return RecordDict({SPARSE_RECORD: record, "metrics": MetricRecord(metrics)})


def raw_record(data: bytes) -> ArrayRecord:
    array = Array(dtype="bytes", shape=(len(data),), stype=SPARSE_STYPE, data=data)
    return ArrayRecord({SPARSE_ARRAY: array})


def with_value(sparse, value):
    """`sparse` with its first tracked value replaced."""
    t = next(t for t in sparse.tensors if t.count)
    t.values[0] = np.float32(value)
    return sparse


def round_of(server_round, trained=None, evaluated=None):
    """A round's stats as the strategy's round loop assembles them from its steps' values."""
    from dropfleet.server.strategies.base import NOT_EVALUATED, Screened, Trained, round_stats

    trained = trained if trained is not None else Trained(Screened(accepted=[]))
    return round_stats("test", server_round, [], [], trained, evaluated or NOT_EVALUATED)


class ScriptedGrid:
    """A Flower Grid whose nodes answer from a script, in process: `answer(node, instruction)`
    gives a reply's content, an `Error`, or None (the node stays silent)."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer, self.sent = list(nodes), answer, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            answer = self.answer(node, m)
            if answer is None:
                continue
            server_round = int(m.metadata.group_id)
            if isinstance(answer, Error):
                replies.append(reply(node, error=answer, server_round=server_round))
            else:
                replies.append(
                    reply(node, answer, server_round=server_round, message_type=m.metadata.message_type)
                )
        return replies
