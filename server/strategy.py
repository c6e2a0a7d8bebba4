"""Flower strategies: sparse DropBack aggregation, and the dense FedAvg baseline.

Both subclass Flower's `FedAvg` and override only the hooks they must: the
configure hooks to meter bytes down, `aggregate_train` to validate and merge
sparse replies (or to meter the dense ones), `aggregate_evaluate` to record
federated accuracy.
"""

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dropfleet.common.codec import decode, encode
from dropfleet.common.errors import ReplyRejectedError, RunFailedError
from dropfleet.common.layer_init import seeded_model
from dropfleet.common.merge import churn, merge_sparse
from dropfleet.common.sparse import SparseModel, dense_deltas
from dropfleet.common.topk import sparsify_with_feedback, zeros
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import (
    DENSE_RECORD,
    TOPK_RECORD,
    pack_sparse,
    pack_topk_update,
    payload_record,
    record_bytes,
    record_payload,
)
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder, RoundStats
from dropfleet.server.store.store import NodeEvent
from dropfleet.server.validation import AcceptedUpdate, validate_reply


class _Metered(FedAvg):
    """Counts messages, failures and payload bytes for the round report."""

    def __init__(self, config: RunConfig, recorder: RoundRecorder, **kwargs: object) -> None:
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=config.min_train_nodes,
            min_evaluate_nodes=1 if config.fraction_evaluate else 0,
            min_available_nodes=config.min_available_nodes,
            **kwargs,
        )
        self.config = config
        self.recorder = recorder
        # Flower's loop counts rounds from 1; a resumed run goes on from the checkpoint's round.
        self.round_offset = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stats = self.recorder.current(server_round)
        stats.sampled = len(messages)
        self._meter_down(stats, messages, arrays)
        return messages

    @staticmethod
    def _meter_down(stats: RoundStats, messages: list[Message], arrays: ArrayRecord) -> None:
        size = record_bytes(arrays)
        stats.bytes_down += len(messages) * size
        for m in messages:
            stats.node_bytes_down[m.metadata.dst_node_id] = (
                stats.node_bytes_down.get(m.metadata.dst_node_id, 0) + size
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._meter_down(self.recorder.current(server_round), messages, arrays)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            stats = self.recorder.current(server_round)
            stats.fed_accuracy = metrics.get("eval-accuracy")
            stats.fed_loss = metrics.get("eval-loss")
        return metrics

    def _record_failures(self, server_round: int, errors: list[Message]) -> None:
        stats = self.recorder.current(server_round)
        stats.failed = len(errors)
        stats.failures = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        stats.node_events += [
            NodeEvent(node_id=m.metadata.src_node_id, outcome="failed", error=m.error.reason) for m in errors
        ]


class _SparseReplies(_Metered):
    """Strategies whose clients reply with a sparse model in the dropfleet wire format."""

    def __init__(self, config: RunConfig, recorder: RoundRecorder, **kwargs: object) -> None:
        super().__init__(config, recorder, **kwargs)
        self._short_rounds = 0

    def _accept(
        self, server_round: int, replies: Iterable[Message], expected: SparseModel
    ) -> list[tuple[Message, AcceptedUpdate]] | None:
        """Validate sparse replies and count the rejected; None for a short round.

        Too many short rounds in a row raise `RunFailedError`.
        """
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        self._record_failures(server_round, errors)
        stats = self.recorder.current(server_round)
        accepted = []
        # Sorted by node so the merge (a float sum) does not depend on arrival order.
        for msg in sorted(valid, key=lambda m: m.metadata.src_node_id):
            try:
                update = validate_reply(msg.content, expected, self.config)
            except ReplyRejectedError as exc:
                stats.rejected += 1
                stats.failures.append(f"node {msg.metadata.src_node_id} rejected: {exc}")
                stats.node_events.append(
                    NodeEvent(
                        node_id=msg.metadata.src_node_id, outcome="rejected", error=str(exc), **_device(msg)
                    )
                )
                log(WARNING, "Rejected reply from node %s: %s", msg.metadata.src_node_id, exc)
                continue
            stats.bytes_up += update.payload_bytes
            stats.node_events.append(
                NodeEvent(
                    node_id=msg.metadata.src_node_id,
                    outcome="accepted",
                    bytes_up=update.payload_bytes,
                    **_device(msg),
                )
            )
            accepted.append((msg, update))
        stats.replied = len(accepted)
        if len(accepted) < self.config.min_train_nodes:
            self._short_rounds += 1
            log(
                WARNING,
                "Round %s: %s acceptable replies < min-train-nodes %s; the global model is unchanged "
                "(%s such round(s) in a row)",
                server_round,
                len(accepted),
                self.config.min_train_nodes,
                self._short_rounds,
            )
            if self._short_rounds >= self.config.max_short_rounds:
                raise RunFailedError(
                    f"{self._short_rounds} rounds in a row had fewer than {self.config.min_train_nodes} "
                    f"acceptable replies (last: {len(accepted)} of {stats.sampled} sampled)"
                )
            return None
        self._short_rounds = 0
        return accepted


class SparseDropBack(_SparseReplies):
    """Merges sparse DropBack replies and publishes the global top-K tracked set."""

    def __init__(
        self, config: RunConfig, recorder: RoundRecorder, checkpoint: Checkpoint | None = None
    ) -> None:
        super().__init__(config, recorder, arrayrecord_key="sparse-model")
        self.global_model = SparseModel.empty(config.model_id, config.seed)
        self.checkpoint = checkpoint
        if checkpoint is not None:
            self.global_model, self._short_rounds = checkpoint.model, checkpoint.short_rounds
            self.round_offset = checkpoint.round

    def initial_arrays(self) -> ArrayRecord:
        """The first global model: the bare seed, or the checkpoint's bytes exactly as published."""
        if self.checkpoint is not None:
            return payload_record(self.checkpoint.payload)
        return self._publish(self.global_model)

    def _publish(self, model: SparseModel) -> ArrayRecord:
        record = pack_sparse(model, self.config.value_precision)
        # Keep exactly what devices will decode (values quantized to the wire precision).
        self.global_model = decode(record_payload(record), self.config.max_payload_bytes)
        return record

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = self._accept(server_round, replies, self.global_model)
        if accepted is None:
            self.recorder.current(server_round).global_tracked = self.global_model.num_tracked
            return None, None
        stats = self.recorder.current(server_round)
        previous = self.global_model
        merged = merge_sparse(
            [(u.model, float(u.num_examples)) for _, u in accepted],
            self.config.global_k,
            rule=self.config.aggregation,
            trim=self.config.trim_fraction,
            clip_norm=self.config.clip_norm or None,
        )
        arrays = self._publish(merged)
        stats.churn = churn(previous, self.global_model)
        stats.global_tracked = self.global_model.num_tracked
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in accepted], self.weighted_by_key)
        stats.train_loss = metrics.get("train-loss")
        log(
            INFO,
            "Round %s: merged %s updates into %s tracked weights",
            server_round,
            len(accepted),
            stats.global_tracked,
        )
        return arrays, metrics


class TopKFedAvg(_SparseReplies):
    """The sparsified-FedAvg baseline: dense models, top-k updates with error feedback both ways.

    Clients keep the dense global model and their residual in their node state
    and send back the top-k of their update (k from their memory budget, as a
    DropBack device); the server averages them, adds its own residual and
    sends the top global-k of that, tagged with the model version it leads to
    (STC-style; every client must take part in every round to stay in sync).
    """

    def __init__(self, config: RunConfig, recorder: RoundRecorder) -> None:
        super().__init__(config, recorder, arrayrecord_key=TOPK_RECORD)
        model = seeded_model(config.model_id, config.seed)
        self.weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        self.residual = zeros(config.model_id)
        self.expected = SparseModel.empty(config.model_id, config.seed)
        self.version = 0
        self.update = encode(self.expected, config.value_precision)

    def initial_arrays(self) -> ArrayRecord:
        return pack_topk_update(self.update, self.version)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # a baseline for the byte race: the server evaluates the global model centrally

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = self._accept(server_round, replies, self.expected)
        if accepted is None:
            return None, None
        mean = merge_sparse(
            [(u.model, float(u.num_examples)) for _, u in accepted],
            sum(u.model.num_tracked for _, u in accepted),  # keep every entry: a plain average
        )
        self.update, received, self.residual = sparsify_with_feedback(
            dense_deltas(mean),
            self.residual,
            self.config.global_k,
            self.config.model_id,
            self.config.seed,
            self.config.value_precision,
        )
        for name, delta in dense_deltas(received).items():
            self.weights[name] += delta
        self.version += 1
        stats = self.recorder.current(server_round)
        stats.global_tracked = received.num_tracked
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in accepted], self.weighted_by_key)
        stats.train_loss = metrics.get("train-loss")
        return pack_topk_update(self.update, self.version), metrics


def _device(msg: Message) -> dict[str, object]:
    """Self-reported device facts of a reply, for the fleet view (never trusted for merging)."""
    out: dict[str, object] = {}
    device = msg.content.config_records.get("device")
    metrics = msg.content.metric_records.get("metrics")
    if device is not None:
        if isinstance(device.get("profile"), str):
            out["profile"] = str(device["profile"])[:64]
        if isinstance(device.get("partition-id"), int):
            out["partition_id"] = int(device["partition-id"])
    if metrics is not None:
        for key, attr in (("budget-bytes", "budget_bytes"), ("k", "k")):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and 0 <= value < 2**62:
                out[attr] = int(value)
    return out


class DenseFedAvg(_Metered):
    """Flower's FedAvg on dense weights, metered the same way (the baseline)."""

    def __init__(self, config: RunConfig, recorder: RoundRecorder) -> None:
        super().__init__(config, recorder, arrayrecord_key=DENSE_RECORD)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        self._record_failures(server_round, errors)
        stats = self.recorder.current(server_round)
        valid = [m for m in replies if not m.has_error()]
        stats.replied = len(valid)
        for m in valid:
            size = (
                record_bytes(m.content.array_records[DENSE_RECORD])
                if DENSE_RECORD in m.content.array_records
                else 0
            )
            stats.node_events.append(
                NodeEvent(node_id=m.metadata.src_node_id, outcome="accepted", bytes_up=size, **_device(m))
            )
        stats.bytes_up = sum(
            record_bytes(m.content.array_records[DENSE_RECORD])
            for m in valid
            if DENSE_RECORD in m.content.array_records
        )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            stats.global_tracked = sum(a.numpy().size for a in arrays.values())
        if metrics is not None:
            stats.train_loss = metrics.get("train-loss")
        return arrays, metrics
