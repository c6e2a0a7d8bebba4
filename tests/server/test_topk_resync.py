"""The top-k baseline on a fleet whose devices miss rounds: catch-up updates or the whole model.

The server strategy and the ClientApp's handler talk through real Flower
messages and node state (no processes): what a device holds after catching up
is bit for bit the server's model.
"""

import io

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from rich.console import Console

from dropfleet.client.app import train
from dropfleet.client.baselines import TOPK_META, TOPK_STATE
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import TOPK_MODEL_RECORD, TOPK_RECORD, pack_topk_update, record_bytes
from dropfleet.fleet.replies import OUT_OF_SYNC
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies import TopKFedAvg
from tests.server.messages import node_contexts

RUN = {"strategy": "topk-ef", "train-subset": 120, "partitioner": "iid", "min-train-nodes": 1}


def contexts(nodes):
    return node_contexts(nodes, RUN)


def play(strategy, server_round, ctxs, nodes, identity):
    """One round with `nodes` sampled: the strategy's instructions, the devices' replies, the merge."""
    arrays = pack_topk_update(strategy.update, strategy.version)
    template = [
        Message(
            content=RecordDict({TOPK_RECORD: arrays, "config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in nodes
    ]
    messages = strategy.tailor(template)
    sent = {}
    replies = []
    for m in messages:
        m.metadata.group_id = str(server_round)
        node = m.metadata.dst_node_id
        sent[node] = (
            next(iter(m.content.array_records)),
            record_bytes(next(iter(m.content.array_records.values()))),
        )
        identity.node_id = node
        replies.append(train(m, ctxs[node]))
    identity.node_id = 0
    strategy.aggregate_train(server_round, replies)
    return sent, replies


def held_weights(ctx):
    return {n: a.numpy() for n, a in ctx.state[TOPK_STATE].items()}


def test_devices_that_missed_rounds_or_join_late_catch_up_to_the_servers_model(task_identity):
    config = RunConfig.from_mapping(RUN)
    strategy = TopKFedAvg(config, RoundRecorder("topk-ef", 5, None, Console(file=io.StringIO())))
    ctxs = contexts([1, 2, 3, 4])
    play(strategy, 1, ctxs, [1, 2, 3], task_identity)  # version 0 -> 1
    play(strategy, 2, ctxs, [1, 2], task_identity)  # node 3 misses version 1 -> 2
    sent, replies = play(strategy, 3, ctxs, [1, 3, 4], task_identity)
    assert sent[1][0] == TOPK_RECORD  # up to date: the plain update
    assert sent[3][0] == TOPK_RECORD and sent[3][1] > sent[1][1]  # the update it missed, then this one
    assert sent[4][0] == TOPK_MODEL_RECORD and sent[4][1] >= 4 * 89_610  # new: the whole model
    assert not any(r.has_error() for r in replies)
    version_3 = {name: w.copy() for name, w in strategy.weights.items()}
    for node in (1, 3, 4):  # each applied what it was sent before training: the server's version 2
        assert ctxs[node].state[TOPK_META]["version"] == 2
    play(strategy, 4, ctxs, [1, 3, 4], task_identity)
    for node in (1, 3, 4):  # bit for bit the server's version 3, however it got there
        assert ctxs[node].state[TOPK_META]["version"] == 3
        for name, w in held_weights(ctxs[node]).items():
            np.testing.assert_array_equal(w, version_3[name])


def test_a_node_that_reports_itself_out_of_sync_gets_the_whole_model_next(task_identity):
    config = RunConfig.from_mapping(RUN)
    strategy = TopKFedAvg(config, RoundRecorder("topk-ef", 5, None, Console(file=io.StringIO())))
    ctxs = contexts([1, 2])
    play(strategy, 1, ctxs, [1, 2], task_identity)
    play(strategy, 2, ctxs, [1, 2], task_identity)
    ctxs[2].state[TOPK_META] = ConfigRecord({"version": 7})  # e.g. restored from elsewhere
    _, replies = play(strategy, 3, ctxs, [1, 2], task_identity)
    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and refused[0].error.code == OUT_OF_SYNC
    sent, replies = play(strategy, 4, ctxs, [1, 2], task_identity)
    assert sent[2][0] == TOPK_MODEL_RECORD and not any(r.has_error() for r in replies)
    assert ctxs[2].state[TOPK_META]["version"] == ctxs[1].state[TOPK_META]["version"] == 3
    for name, w in held_weights(ctxs[2]).items():
        np.testing.assert_array_equal(w, held_weights(ctxs[1])[name])


def test_the_history_keeps_only_what_a_catch_up_can_still_send(task_identity):
    """Bounded by the model's size, not the run's length: a node further behind gets the whole
    model anyway, so older updates are dropped; and the whole model is built once per version."""
    config = RunConfig.from_mapping(RUN)
    strategy = TopKFedAvg(config, RoundRecorder("topk-ef", 40, None, Console(file=io.StringIO())))
    ctxs = contexts([1, 2, 3])
    play(strategy, 1, ctxs, [1, 2, 3], task_identity)  # node 3 then sits out for good
    for r in range(2, 30):
        play(strategy, r, ctxs, [1, 2], task_identity)
        kept = sum(map(len, strategy.history.values()))
        assert kept <= strategy.dense_bytes + len(strategy.update), (r, kept)
        assert strategy.version in strategy.history
    assert min(strategy.history) > 2  # the versions node 3 would need are gone...
    sent, replies = play(strategy, 30, ctxs, [1, 3], task_identity)
    assert sent[1][0] == TOPK_RECORD and sent[3][0] == TOPK_MODEL_RECORD  # ...it gets the whole model
    assert not any(r.has_error() for r in replies)
    messages = strategy.tailor(
        [
            Message(
                content=RecordDict({"config": ConfigRecord({"server-round": 31})}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in (7, 8)  # two new nodes: one dense record, shared
        ]
    )
    records = [m.content.array_records[TOPK_MODEL_RECORD] for m in messages]
    assert records[0] is records[1]
