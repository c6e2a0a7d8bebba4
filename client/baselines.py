"""The baselines' ClientApp handlers: dense FedAvg and sparsified FedAvg (top-k with error feedback).

They train with torch (client/local.py): the registry (fleet/strategies.py)
loads them only for runs of their strategies, and a lean board (node config
`runtime = "lean"`) refuses those runs before anything is loaded.
"""

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from dropfleet.client.app import Job
from dropfleet.client.local import train_dense, train_topk
from dropfleet.common.device.evaluation import EvalResult
from dropfleet.common.device.train import evaluate
from dropfleet.common.errors import OutOfSyncError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import dense_deltas
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.wire.topk import zeros
from dropfleet.fleet.records import (
    DENSE_RECORD,
    SPARSE_RECORD,
    TOPK_MODEL_RECORD,
    TOPK_RECORD,
    payload_record,
    unpack_topk_model,
    unpack_topk_update,
)
from dropfleet.fleet.replies import TrainReply

# Node state of the sparsified-FedAvg baseline (kept across rounds by Flower).
TOPK_STATE, TOPK_RESIDUAL, TOPK_META = "topk-model", "topk-residual", "topk"


def fedavg_trainer(msg: Message, context: Context, job: Job) -> Message:
    """The dense baseline: train the whole model it was sent."""
    state = msg.content.array_records[DENSE_RECORD].to_torch_state_dict()
    new_state, loss = train_dense(state, job.train_data, job.config, job.server_round)
    reply = TrainReply(ArrayRecord(new_state), len(job.train_data), loss, DENSE_RECORD)
    return Message(reply.to_record(), reply_to=msg)


def topk_trainer(msg: Message, context: Context, job: Job) -> Message:
    """The sparsified-FedAvg baseline: the dense model and residual live in this node's state.

    The server sends the update to its current version, preceded by the ones this node
    missed, or the whole model when the node holds none it can update from.
    """
    config, records, state = job.config, msg.content.array_records, context.state
    if TOPK_STATE not in state.array_records:  # version 0: the seeded model, no residual yet
        model = seeded_model(config.model_id, config.seed)
        state[TOPK_STATE] = ArrayRecord({n: Array(p.detach().numpy()) for n, p in model.named_parameters()})
        state[TOPK_RESIDUAL] = ArrayRecord({n: Array(a) for n, a in zeros(config.model_id).items()})
        state[TOPK_META] = ConfigRecord({"version": 0})
    held = int(state[TOPK_META]["version"])
    if TOPK_MODEL_RECORD in records:
        weights, version = unpack_topk_model(records[TOPK_MODEL_RECORD], model_layout(config.model_id).shapes)
    else:
        updates, version = unpack_topk_update(records[TOPK_RECORD], config.max_payload_bytes)
        weights = {n: a.numpy().copy() for n, a in state[TOPK_STATE].items()}
        first = version - len(updates) + 1  # the version the oldest update leads to
        if not first <= held + 1 <= version + 1:
            raise OutOfSyncError(
                f"out of sync: this node holds model version {held}, the updates lead from "
                f"{first - 1} to {version}"
            )
        for update in updates[held + 1 - first :]:
            for name, delta in dense_deltas(update).items():
                weights[name] += delta
    residual = {n: a.numpy().copy() for n, a in state[TOPK_RESIDUAL].items()}
    payload, residual, loss, k = train_topk(
        weights, residual, job.train_data, job.profile, config, job.server_round
    )
    state[TOPK_STATE] = ArrayRecord({n: Array(a) for n, a in weights.items()})
    state[TOPK_RESIDUAL] = ArrayRecord({n: Array(a) for n, a in residual.items()})
    state[TOPK_META] = ConfigRecord({"version": version})
    reply = TrainReply(
        arrays=payload_record(payload),
        num_examples=len(job.train_data),
        train_loss=loss,
        array_key=SPARSE_RECORD,
        k=k,
        profile=job.profile.name,
        partition_id=job.partition_id,
    )
    return Message(reply.to_record(), reply_to=msg)


def fedavg_evaluator(msg: Message, context: Context, job: Job) -> EvalResult:
    model = seeded_model(job.config.model_id, job.config.seed)
    model.load_state_dict(msg.content.array_records[DENSE_RECORD].to_torch_state_dict())
    return evaluate(model, job.val_data)
