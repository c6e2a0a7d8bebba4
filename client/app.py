"""The Flower ClientApp: a device that trains DropBack under its memory budget.

Thin by design: unpack the message, call client/local.py, pack the reply.
One round on a device: `train` reads the run's config, finds the run's
strategy in fleet/strategies.py, checks the instruction carries that
strategy's records, loads the device's data and hands a `Job` to the
strategy's trainer here (`dropback_trainer`, `fedavg_trainer`,
`topk_trainer`); `evaluate_global` the same with its evaluator.
A refusal (budget too small, device unavailable this round, bad global model)
is an error reply with a clear reason, which the server logs and counts.
"""

from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from dropfleet.client.audit import audit_mod
from dropfleet.client.local import evaluate_sparse, local_data, train_dense, train_sparse, train_topk
from dropfleet.client.round import is_available, uplink_payload
from dropfleet.common.device.data import Split
from dropfleet.common.device.train import EvalResult, evaluate
from dropfleet.common.errors import BudgetError, ConfigError, DropfleetError, OutOfSyncError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, dense_deltas
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.wire.downlink import GlobalSet, apply_delta
from dropfleet.common.wire.topk import zeros
from dropfleet.common.wire.uplink import NO_RESIDUAL, Residual
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import DeviceProfile, get_profile, profile_for_partition
from dropfleet.fleet.records import (
    DENSE_RECORD,
    GLOBAL_DELTA_RECORD,
    GLOBAL_DELTA_STYPE,
    SPARSE_RECORD,
    TOPK_MODEL_RECORD,
    TOPK_RECORD,
    payload_record,
    record_payload,
    unpack_sparse,
    unpack_topk_model,
    unpack_topk_update,
)
from dropfleet.fleet.replies import (
    BAD_REQUEST,
    OUT_OF_SYNC,
    REFUSED_BUDGET,
    UNAVAILABLE,
    EvaluateReply,
    TrainReply,
)
from dropfleet.fleet.strategies import StrategySpec, spec

# Node state of the sparsified-FedAvg baseline (kept across rounds by Flower).
TOPK_STATE, TOPK_RESIDUAL, TOPK_META = "topk-model", "topk-residual", "topk"

# Node state of the change-coded uplink: the quantization error not yet sent.
UPLINK_RESIDUAL = "uplink-residual"

# Node state of the delta downlink: the last global set this node trained from, O(K).
GLOBAL_HELD, GLOBAL_HELD_META = "global-held", "global-held-meta"

app = ClientApp(mods=[audit_mod])


def _refusal_code(exc: DropfleetError) -> int:
    if isinstance(exc, BudgetError):
        return REFUSED_BUDGET
    return OUT_OF_SYNC if isinstance(exc, OutOfSyncError) else BAD_REQUEST


def _residual(record: ArrayRecord | None) -> Residual:
    if record is None:
        return NO_RESIDUAL
    return record["positions"].numpy(), record["values"].numpy()


def _node(context: Context, config: RunConfig) -> tuple[int, int, DeviceProfile]:
    node = context.node_config
    partition_id = int(node.get("partition-id", 0))
    num_partitions = int(node.get("num-partitions", 1))
    if "profile" in node:
        profile = get_profile(str(node["profile"]))
    else:
        profile = profile_for_partition(partition_id, config.profiles)
    if "state-budget-bytes" in node:  # a real board states its own budget
        profile = replace(profile, state_budget_bytes=int(node["state-budget-bytes"]))
    return partition_id, num_partitions, profile


def _held_global(context: Context, config: RunConfig) -> GlobalSet | None:
    arrays = context.state.array_records.get(GLOBAL_HELD)
    meta = context.state.config_records.get(GLOBAL_HELD_META)
    if arrays is None or meta is None:
        return None
    return GlobalSet(
        model_id=config.model_id,
        seed=config.seed,
        version=int(meta["version"]),
        grid_exponent=int(meta["grid-exponent"]),
        positions=arrays["positions"].numpy(),
        units=arrays["units"].numpy().astype(np.int64),
        init_scheme=int(meta["init-scheme"]),
    )


def _keep_global(context: Context, held: GlobalSet) -> None:
    context.state[GLOBAL_HELD] = ArrayRecord(
        {"positions": Array(held.positions), "units": Array(held.units.astype(np.int32))}
    )
    context.state[GLOBAL_HELD_META] = ConfigRecord(
        {"version": held.version, "grid-exponent": held.grid_exponent, "init-scheme": held.init_scheme}
    )


def _global_model(
    msg: Message, context: Context, config: RunConfig, server_round: int
) -> tuple[SparseModel, GlobalSet | None]:
    """The global model an instruction carries: whole, or a delta from the set this node holds."""
    records = msg.content.array_records
    if GLOBAL_DELTA_RECORD not in records:
        return unpack_sparse(msg.content, config.max_payload_bytes), None
    payload = record_payload(records[GLOBAL_DELTA_RECORD], GLOBAL_DELTA_STYPE)
    new = apply_delta(_held_global(context, config), payload, config.max_payload_bytes)
    if server_round and new.version != server_round:
        raise ConfigError(f"round {server_round} sent global version {new.version}")
    return new.to_sparse(), new


def _data_dir(context: Context) -> str | None:
    """Node config `data-dir`: the device's own data (common.data.load_device_data); else Fashion-MNIST."""
    value = context.node_config.get("data-dir")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"node config 'data-dir' must be a path, got {value!r}")
    return value or None


def _refuse(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


@dataclass(frozen=True)
class Job:
    """What a trainer is handed: the run's config, this device, its data and the round."""

    config: RunConfig
    profile: DeviceProfile
    partition_id: int
    server_round: int
    train_data: Split
    val_data: Split


def _unexpected(msg: Message, strategy: StrategySpec) -> str | None:
    """Why an instruction is not one of the run's strategy's (None: it is)."""
    carried = list(msg.content.array_records)
    if len(carried) == 1 and carried[0] in strategy.records:
        return None
    return f"strategy {strategy.name!r} sends one of {list(strategy.records)}, this instruction {carried}"


def _job(msg: Message, context: Context, training: bool) -> tuple[StrategySpec, Job] | Message:
    """The run's strategy and this round's job, or the refusal to send instead."""
    config = RunConfig.from_mapping(context.run_config)
    strategy = spec(config.strategy)
    partition_id, num_partitions, profile = _node(context, config)
    server_round = int(msg.content["config"].get("server-round", 0))
    where = f"{profile.name} node {partition_id}"
    if training and not is_available(profile, config, server_round, partition_id):
        return _refuse(msg, UNAVAILABLE, f"{where} unavailable this round")
    unexpected = _unexpected(msg, strategy)
    if unexpected is not None:
        return _refuse(msg, BAD_REQUEST, f"{where}: {unexpected}")
    try:
        train_data, val_data = local_data(config, partition_id, num_partitions, _data_dir(context))
    except DropfleetError as exc:
        return _refuse(msg, BAD_REQUEST, f"{where}: {exc}")
    return strategy, Job(config, profile, partition_id, server_round, train_data, val_data)


@app.train()
def train(msg: Message, context: Context) -> Message:
    found = _job(msg, context, training=True)
    if isinstance(found, Message):
        return found
    strategy, job = found
    try:
        return strategy.train_handler()(msg, context, job)
    except DropfleetError as exc:
        return _refuse(msg, _refusal_code(exc), f"{job.profile.name} node {job.partition_id}: {exc}")


def fedavg_trainer(msg: Message, context: Context, job: Job) -> Message:
    """The dense baseline: train the whole model it was sent."""
    state = msg.content.array_records[DENSE_RECORD].to_torch_state_dict()
    new_state, loss = train_dense(state, job.train_data, job.config, job.server_round)
    reply = TrainReply(ArrayRecord(new_state), len(job.train_data), loss, DENSE_RECORD)
    return Message(reply.to_record(), reply_to=msg)


def dropback_trainer(msg: Message, context: Context, job: Job) -> Message:
    """DropBack under the device's budget, from the global set it was sent (whole or a delta)."""
    config = job.config
    global_model, held = _global_model(msg, context, config, job.server_round)
    streaming = context.node_config.get("streaming", False)  # stream even when the dense step fits
    if not isinstance(streaming, bool):
        raise ConfigError(f"node config 'streaming' must be true or false, got {streaming!r}")
    update = train_sparse(global_model, job.train_data, job.profile, config, job.server_round, streaming)
    residual = _residual(context.state.array_records.get(UPLINK_RESIDUAL))
    payload, residual = uplink_payload(update.model, global_model, config, job.server_round, residual)
    if config.uplink_coding == "change":  # O(k): the unsent error at this device's tracked positions
        context.state[UPLINK_RESIDUAL] = ArrayRecord(
            {"positions": Array(residual[0]), "values": Array(residual[1])}
        )
    if held is not None:  # kept with a reply only: the server counts this node at this version then
        _keep_global(context, held)
    reply = TrainReply(
        arrays=payload_record(payload),
        num_examples=update.num_examples,
        train_loss=update.train_loss,
        array_key=SPARSE_RECORD,
        k=update.k,
        state_bytes=update.state_bytes,
        peak_bytes=update.peak_bytes,
        budget_bytes=update.budget_bytes,
        profile=job.profile.name,
        partition_id=job.partition_id,
        trainer=update.trainer,
    )
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


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    found = _job(msg, context, training=False)
    if isinstance(found, Message):
        return found
    strategy, job = found
    evaluator = strategy.evaluate_handler()
    if evaluator is None:
        return _refuse(msg, BAD_REQUEST, f"strategy {strategy.name!r} evaluates on the server only")
    try:
        result = evaluator(msg, context, job)
    except DropfleetError as exc:
        return _refuse(msg, BAD_REQUEST, str(exc))
    reply = EvaluateReply(num_examples=result.examples, eval_loss=result.loss, eval_accuracy=result.accuracy)
    return Message(reply.to_record(), reply_to=msg)


def fedavg_evaluator(msg: Message, context: Context, job: Job) -> EvalResult:
    model = seeded_model(job.config.model_id, job.config.seed)
    model.load_state_dict(msg.content.array_records[DENSE_RECORD].to_torch_state_dict())
    return evaluate(model, job.val_data)


def dropback_evaluator(msg: Message, context: Context, job: Job) -> EvalResult:
    global_model, _ = _global_model(msg, context, job.config, 0)  # evaluated, not kept
    return evaluate_sparse(global_model, job.val_data, job.train_data)
