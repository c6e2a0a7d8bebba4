"""The delta downlink on a fleet whose devices miss rounds: the strategy and the ClientApp on real messages.

The server strategy and the ClientApp's handler talk through real Flower
messages and node state (no processes): what a device holds after any
pattern of missed rounds is bit for bit the server's published set, and the
bytes metered are the messages each node was really sent.
"""

import io

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from rich.console import Console

from dropfleet.client.app import GLOBAL_HELD, GLOBAL_HELD_META, evaluate_global, train
from dropfleet.common.wire.codec import decode
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import (
    GLOBAL_DELTA_RECORD,
    GLOBAL_DELTA_STYPE,
    SPARSE_RECORD,
    record_bytes,
    record_payload,
)
from dropfleet.fleet.replies import OUT_OF_SYNC
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies import SparseDropBack
from tests.server.messages import node_contexts

RUN = {
    "strategy": "dropback-momentum",
    "downlink-coding": "delta",
    "value-precision": "int4",
    "train-subset": 120,
    "partitioner": "iid",
    "min-train-nodes": 1,
    "global-k": 4000,
}


def contexts(nodes):
    return node_contexts(nodes, RUN)


def play(strategy, server_round, ctxs, nodes, identity):
    """One round with `nodes` sampled: the strategy's instructions, the devices' replies, the merge."""
    messages = strategy.tailor(
        [
            Message(
                content=RecordDict(
                    {
                        SPARSE_RECORD: strategy.initial_arrays(),
                        "config": ConfigRecord({"server-round": server_round}),
                    }
                ),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes
        ]
    )
    sent, replies = {"whole": len(strategy.downlink.message_for(None))}, []
    for m in messages:
        m.metadata.group_id = str(server_round)
        node = m.metadata.dst_node_id
        (key, record), *rest = m.content.array_records.items()
        assert key == GLOBAL_DELTA_RECORD and not rest and record["model"].stype == GLOBAL_DELTA_STYPE
        sent[node] = record_bytes(record)
        identity.node_id = node
        replies.append(train(m, ctxs[node]))
    identity.node_id = 0
    assert strategy.aggregate_train(server_round, replies).screened.rejected == 0
    return sent, replies


def held(ctx):
    meta = ctx.state[GLOBAL_HELD_META]
    arrays = ctx.state[GLOBAL_HELD]
    return int(meta["version"]), arrays["positions"].numpy(), arrays["units"].numpy()


def new_strategy():
    config = RunConfig.from_mapping(RUN)
    return SparseDropBack(config, RoundRecorder("dropback", 6, None, Console(file=io.StringIO())))


def test_devices_that_miss_rounds_or_join_late_hold_the_servers_set_bit_for_bit(task_identity):
    strategy = new_strategy()
    ctxs = contexts([1, 2, 3, 4])
    play(strategy, 1, ctxs, [1, 2, 3], task_identity)  # version 1: the empty set
    play(strategy, 2, ctxs, [1, 2, 3], task_identity)
    play(strategy, 3, ctxs, [1, 2], task_identity)  # node 3 misses version 3
    sent, replies = play(strategy, 4, ctxs, [1, 3, 4], task_identity)
    assert not any(r.has_error() for r in replies)
    whole = sent.pop("whole")
    assert sent[4] == whole  # new: the whole set
    assert sent[1] < sent[3] < whole  # one version behind < two behind < everything
    for node in (1, 3, 4):  # each trained from version 4, exactly the server's
        version, positions, units = held(ctxs[node])
        published = strategy.downlink.history[4]
        assert version == 4
        assert np.array_equal(positions, published.positions) and np.array_equal(units, published.units)
    # The published global (store, REST) is that set's values exactly, fp32.
    current = decode(record_payload(strategy.initial_arrays()))
    assert current.flat_values().tobytes() == strategy.downlink.current.values().tobytes()
    assert strategy.global_model.flat_values().tobytes() == current.flat_values().tobytes()


def test_a_node_out_of_sync_refuses_without_training_and_gets_the_whole_set_next(task_identity):
    strategy = new_strategy()
    ctxs = contexts([1, 2])
    play(strategy, 1, ctxs, [1, 2], task_identity)
    play(strategy, 2, ctxs, [1, 2], task_identity)
    units = ctxs[2].state[GLOBAL_HELD]["units"].numpy().copy()
    units[0] += 1  # a corrupted copy: its rebuilt set fails the digest
    ctxs[2].state[GLOBAL_HELD]["units"] = type(ctxs[2].state[GLOBAL_HELD]["units"])(units)
    _, replies = play(strategy, 3, ctxs, [1, 2], task_identity)
    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and refused[0].error.code == OUT_OF_SYNC and "digest" in refused[0].error.reason
    assert held(ctxs[2])[0] == 2  # nothing changed on the device
    sent, replies = play(strategy, 4, ctxs, [1, 2], task_identity)
    assert sent[2] == sent["whole"]
    assert not any(r.has_error() for r in replies)
    assert held(ctxs[2])[0] == held(ctxs[1])[0] == 4
    assert np.array_equal(held(ctxs[2])[2], held(ctxs[1])[2])


def test_evaluation_gets_the_delta_too_and_keeps_nothing(task_identity):
    strategy = new_strategy()
    ctxs = contexts([1])
    play(strategy, 1, ctxs, [1], task_identity)
    play(strategy, 2, ctxs, [1], task_identity)
    [msg] = strategy.tailor(
        [
            Message(
                content=RecordDict(
                    {SPARSE_RECORD: strategy.initial_arrays(), "config": ConfigRecord({"server-round": 2})}
                ),
                dst_node_id=1,
                message_type=MessageType.EVALUATE,
            )
        ]
    )
    assert record_bytes(msg.content.array_records[GLOBAL_DELTA_RECORD]) < len(
        strategy.downlink.message_for(None)
    )
    task_identity.node_id = 1
    reply = evaluate_global(msg, ctxs[1])
    assert not reply.has_error() and reply.content.metric_records["metrics"]["eval-accuracy"] > 0
    assert held(ctxs[1])[0] == 2  # evaluating version 3 does not move what the device holds


def test_a_resumed_run_publishes_the_same_set_and_sends_everyone_the_whole_set_once(task_identity):
    strategy = new_strategy()
    ctxs = contexts([1, 2])
    play(strategy, 1, ctxs, [1, 2], task_identity)
    play(strategy, 2, ctxs, [1, 2], task_identity)
    payload = record_payload(strategy.initial_arrays())  # what the store keeps for round 2
    checkpoint = Checkpoint("run", 2, payload, decode(payload), 0, strategy.published_state())
    resumed = SparseDropBack(
        RunConfig.from_mapping(RUN),
        RoundRecorder("dropback", 6, None, Console(file=io.StringIO())),
        checkpoint=checkpoint,
    )
    before, after = strategy.downlink.current, resumed.downlink.current
    assert after.version == before.version == 3 and after.digest() == before.digest()
    # the resumed server knows no device's version: the whole set, which devices rebuild exactly
    sent, replies = play(resumed, 3, ctxs, [1, 2], task_identity)
    assert sent[1] == sent[2] == sent["whole"] and not any(r.has_error() for r in replies)
    assert held(ctxs[1])[0] == 3 and np.array_equal(held(ctxs[1])[2], before.units)
    assert resumed.held == {1: 3, 2: 3} and resumed.downlink.current.version == 4
