"""The Flower ClientApp: a device that trains DropBack under its memory budget.

Thin by design: unpack the message, call client/local.py, pack the reply.
One round on a device: `train` reads the run's config, finds the run's
strategy in fleet/strategies.py, checks the instruction carries that
strategy's records, loads the device's data and hands a `Job` to the
strategy's trainer (`dropback_trainer` here; the baselines' in
client/baselines.py); `evaluate_global` the same with its evaluator. The
node's `runtime` trains: torch (client/local.py) or, on a board without torch,
NumPy alone (client/lean.py).
A refusal (budget too small, device unavailable this round, bad global model)
is an error reply with a clear reason, which the server logs and counts.
"""

from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from dropfleet.client.audit import audit_mod
from dropfleet.client.footprint import board_footprint
from dropfleet.client.round import is_available, uplink_payload
from dropfleet.common.device.evaluation import EvalResult
from dropfleet.common.errors import BudgetError, ConfigError, DropfleetError, OutOfSyncError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.downlink import GlobalSet, apply_delta
from dropfleet.common.wire.uplink import NO_RESIDUAL, Residual
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import DeviceProfile, get_profile, profile_for_partition
from dropfleet.fleet.records import (
    GLOBAL_DELTA_RECORD,
    GLOBAL_DELTA_STYPE,
    SPARSE_RECORD,
    payload_record,
    record_payload,
    unpack_sparse,
)
from dropfleet.fleet.replies import (
    BAD_REQUEST,
    BOARD_RSS_BYTES,
    METRICS_RECORD,
    OUT_OF_SYNC,
    PROCESS_RSS_BYTES,
    REFUSED_BUDGET,
    UNAVAILABLE,
    EvaluateReply,
    TrainReply,
)
from dropfleet.fleet.strategies import StrategySpec, spec

if TYPE_CHECKING:
    from dropfleet.client.lean import Examples
    from dropfleet.common.device.data import Split

# How a node trains (node config `runtime`): torch (client/local.py), or NumPy alone
# (client/lean.py: a board without torch; DropBack strategies only).
RUNTIMES = ("torch", "lean")

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


def runtime(context: Context) -> ModuleType:
    """The module that trains this node's rounds (node config `runtime`, default torch); only the
    chosen one is imported, so a lean board never imports torch."""
    name = context.node_config.get("runtime", "torch")
    if name == "lean":
        from dropfleet.client import lean

        return lean
    if name == "torch":
        try:
            from dropfleet.client import local
        except ImportError as exc:  # a board installed without torch, left at the default runtime
            reason = f'the torch runtime cannot load here ({exc}): set node config runtime="lean"'
            raise ConfigError(reason) from None
        return local
    raise ConfigError(f"node config 'runtime' must be one of {RUNTIMES}, got {name!r}")


@dataclass(frozen=True)
class Job:
    """What a trainer is handed: the run's config, this device, its data and the round."""

    config: RunConfig
    profile: DeviceProfile
    partition_id: int
    server_round: int
    train_data: "Split | Examples"
    val_data: "Split | Examples"
    runtime: ModuleType


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
    chosen = context.node_config.get("runtime", "torch")
    if chosen in RUNTIMES and chosen not in strategy.runtimes:
        return _refuse(
            msg,
            BAD_REQUEST,
            f"{where}: strategy {strategy.name!r} trains with torch; this node runs {chosen}",
        )
    try:
        trains = runtime(context)
        train_data, val_data = trains.local_data(config, partition_id, num_partitions, _data_dir(context))
    except DropfleetError as exc:
        return _refuse(msg, BAD_REQUEST, f"{where}: {exc}")
    return strategy, Job(config, profile, partition_id, server_round, train_data, val_data, trains)


@app.train()
def train(msg: Message, context: Context) -> Message:
    found = _job(msg, context, training=True)
    if isinstance(found, Message):
        return found
    strategy, job = found
    try:
        reply = strategy.train_handler()(msg, context, job)
    except DropfleetError as exc:
        return _refuse(msg, _refusal_code(exc), f"{job.profile.name} node {job.partition_id}: {exc}")
    if not reply.has_error():  # every strategy's reply: what the board's processes peaked at
        metrics = reply.content.metric_records[METRICS_RECORD]
        footprint = board_footprint()
        for key, value in (
            (PROCESS_RSS_BYTES, footprint.process_rss_bytes),
            (BOARD_RSS_BYTES, footprint.board_rss_bytes),
        ):
            if value is not None:
                metrics[key] = value
    return reply


def dropback_trainer(msg: Message, context: Context, job: Job) -> Message:
    """DropBack under the device's budget, from the global set it was sent (whole or a delta)."""
    config = job.config
    global_model, held = _global_model(msg, context, config, job.server_round)
    streaming = context.node_config.get("streaming", False)  # stream even when the dense step fits
    if not isinstance(streaming, bool):
        raise ConfigError(f"node config 'streaming' must be true or false, got {streaming!r}")
    update = job.runtime.train_sparse(
        global_model, job.train_data, job.profile, config, job.server_round, streaming
    )
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


def dropback_evaluator(msg: Message, context: Context, job: Job) -> EvalResult:
    global_model, _ = _global_model(msg, context, job.config, 0)  # evaluated, not kept
    return job.runtime.evaluate_sparse(global_model, job.val_data, job.train_data)
