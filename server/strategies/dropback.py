"""Federated DropBack ("dropback", and "dropback-momentum" with fleet/config.py's recipe).

Its steps of the round (server/strategies/base.py plays them in order):
`tailor` sends each node the global tracked set, whole or (delta downlink) as
the change since the version the node holds;
`aggregate_train` takes the screened replies (`check_reply`: the sparse wire
format against the global sent this round), settles what each node holds,
and merges: the update memory's replays, then `common/merge.next_global` (the
rule, clipping, the server optimizer, the global top-K), publishing the new
global as the next round's version. A round with fewer than
`min-train-nodes` acceptable replies keeps the global (`Trained.short`).
"""

from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from torch import nn

from dropfleet.common.aggregate.merge import churn, next_global
from dropfleet.common.aggregate.server_opt import ServerAdam, ServerMomentum, ServerOptimizer
from dropfleet.common.aggregate.update_memory import UpdateMemory
from dropfleet.common.device.train import recalibrate_batch_norm
from dropfleet.common.model.sparse import SparseModel, num_weights
from dropfleet.common.model.torch_model import materialize
from dropfleet.common.wire.codec import decode
from dropfleet.common.wire.downlink import DownlinkPublisher, GlobalSet
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import (
    GLOBAL_DELTA_RECORD,
    GLOBAL_DELTA_STYPE,
    pack_sparse,
    payload_record,
    record_payload,
)
from dropfleet.fleet.replies import OUT_OF_SYNC
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, FleetStrategy, Trained, reinstruct
from dropfleet.server.validation import AcceptedUpdate, allowed_k, validate_sparse_reply


class SparseDropBack(FleetStrategy):
    """Merges sparse DropBack replies and publishes the global top-K tracked set.

    Between the merge and the top K, an optional server optimizer
    (`server-optimizer`: FedAvgM momentum, FedAdam or FedYogi; `common/aggregate/server_opt.py`),
    whose state is published with every round and continued by a resumed run.

    With `update-memory-rounds` the merge also replays each device's latest
    accepted update in the rounds it sits out (MIFA; `common/aggregate/update_memory.py`):
    server memory only, not checkpointed (a resumed run starts it empty). A
    refused reply drops its node's kept update.

    It holds the published model decoded (`global_model`, values as devices
    see them) and encoded (`payload`), so evaluation and the store take it
    from here, never decoding the message again.

    With `downlink-coding = "delta"` each version is made by a
    `DownlinkPublisher` (common/wire/downlink.py) and every device is sent the
    change since the version it holds: the version of its last accepted reply
    (a rejected reply, or a device reporting itself out of sync, gets the
    whole set next time). The global sent in round r is version r.
    """

    def __init__(
        self,
        config: RunConfig,
        recorder: RoundRecorder,
        evaluation: Evaluation | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        super().__init__(config, recorder, evaluation, checkpoint)
        self.max_k = allowed_k(config)
        self.server_opt = server_optimizer(config) if config.uses_server_optimizer else None
        if checkpoint is not None and self.server_opt is not None:
            if checkpoint.server_state is not None:
                self.server_opt.load(checkpoint.server_state)
                log(INFO, "Resumed the server optimizer's state from round %s", checkpoint.round)
            else:  # a checkpoint published before its optimizer state was kept
                log(WARNING, "Round %s has no server optimizer state: it restarts at zero", checkpoint.round)
        self.memory = (
            UpdateMemory(config.update_memory_rounds, config.update_memory_bytes)
            if config.update_memory_rounds
            else None
        )
        self.downlink: DownlinkPublisher | None = None
        self.held: dict[int, int] = {}  # delta downlink: node id -> the global version it holds
        start = checkpoint.model if checkpoint else SparseModel.empty(config.model_id, config.seed)
        if config.downlink_coding == "delta":
            first = GlobalSet.on_grid(start, self.round_offset + 1, config.downlink_grid_exponent)
            self.downlink = DownlinkPublisher(first, config.value_precision)
        if checkpoint is not None:  # the published bytes exactly, not re-encoded
            self.global_model, self.payload = checkpoint.model, checkpoint.payload
            if (
                self.downlink is not None
            ):  # what devices rebuild (the same values for a delta run's checkpoint)
                self.global_model = self.downlink.current.to_sparse()
        else:
            self._publish_model(start)

    def published_state(self) -> bytes | None:
        return self.server_opt.state() if self.server_opt is not None else None

    def initial_arrays(self) -> ArrayRecord:
        """The first global model: the bare seed, or the checkpoint's bytes exactly as published."""
        return payload_record(self.payload)

    def _publish_model(self, model: SparseModel) -> ArrayRecord:
        if self.downlink is not None:  # the version devices rebuild, exact in fp32 for the store and REST
            self.global_model = self.downlink.current.to_sparse()
            record = pack_sparse(self.global_model, "fp32")
            self.payload = record_payload(record)
            return record
        record = pack_sparse(model, self.config.value_precision)
        self.payload = record_payload(record)
        # Keep exactly what devices will decode (values quantized to the wire precision).
        self.global_model = decode(self.payload, self.config.max_payload_bytes)
        return record

    def tailor(self, messages: list[Message]) -> list[Message]:
        """Delta downlink: each node gets the change since the version it holds (or the whole set)."""
        if self.downlink is None:
            return messages
        return [
            reinstruct(
                m,
                GLOBAL_DELTA_RECORD,
                payload_record(
                    self.downlink.message_for(self.held.get(m.metadata.dst_node_id)), GLOBAL_DELTA_STYPE
                ),
            )
            for m in messages
        ]

    def check_reply(self, content: RecordDict, server_round: int) -> AcceptedUpdate:
        # The global sent in round r is version r: change-coded replies are against it.
        return validate_sparse_reply(content, self.global_model, self.config, self.max_k, server_round)

    def aggregate_train(self, server_round: int, replies: list[Message]) -> Trained[Any]:
        trained = super().aggregate_train(server_round, replies)
        self._settle_nodes(server_round, replies, set(trained.nodes))
        if len(trained.updates) < self.config.min_train_nodes:
            if self.downlink is not None:  # the same set, as the version the next round sends
                self.downlink.republish(server_round + 1)
            return replace(trained, short=True, global_tracked=self.global_model.num_tracked)
        previous = self.global_model
        updates = trained.updates
        merging = [(u.model, float(u.num_examples)) for u in updates]
        if self.memory is not None:
            fresh = zip(trained.nodes, updates, strict=True)
            merging = self.memory.augment(
                server_round, previous, [(node, u.model, float(u.num_examples)) for node, u in fresh]
            )
        merged = next_global(
            previous,
            merging,
            self.config.global_k_count,
            rule=self.config.aggregation,
            trim=self.config.trim_fraction,
            clip_norm=self.config.clip_norm or None,
            server_opt=self.server_opt,
        )
        if self.downlink is not None:
            self.downlink.publish(merged, server_round + 1)
        arrays = self._publish_model(merged)
        replayed = len(merging) - len(updates)
        log(
            INFO,
            "Round %s: merged %s updates (%s replayed from the update memory) into %s tracked weights",
            server_round,
            len(merging),
            replayed,
            self.global_model.num_tracked,
        )
        return trained.merged(
            arrays,
            self.global_model.num_tracked,
            churn=churn(previous, self.global_model),
            replayed=replayed,
        )

    def _settle_nodes(self, server_round: int, replies: list[Message], accepted: set[int]) -> None:
        """What each node holds after this round's replies.

        Delta downlink: an accepted reply's node kept this round's version; a
        rejected one, or one that says it is lost, gets the whole set next
        time. Update memory: a rejected reply drops its node's kept update
        (an unavailable device's error reply keeps it, to be replayed).
        """
        for m in replies:
            node = m.metadata.src_node_id
            if node in accepted:
                if self.downlink is not None:
                    self.held[node] = server_round
                continue
            rejected = not m.has_error()
            if rejected or m.error.code == OUT_OF_SYNC:
                self.held.pop(node, None)
            if rejected and self.memory is not None:
                self.memory.forget(node)

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        model = materialize(self.global_model)
        assert self.evaluation is not None
        recalibrate_batch_norm(model, self.evaluation.calibration)  # BN statistics do not travel
        return model

    def published_payload(self, arrays: ArrayRecord) -> bytes:
        return self.payload


def server_optimizer(config: RunConfig) -> ServerOptimizer:
    """The run's server optimizer over the model's N coordinates."""
    n = num_weights(config.model_id)
    if config.server_optimizer == "momentum":
        return ServerMomentum(n, config.server_momentum, config.server_learning_rate)
    return ServerAdam(
        n,
        config.server_learning_rate,
        config.server_beta1,
        config.server_beta2,
        config.server_tau,
        yogi=config.server_optimizer == "yogi",
    )
