"""Flower strategies: sparse DropBack aggregation, and the dense FedAvg baseline.

Both subclass Flower's `FedAvg` and override only the hooks they must: the
configure hooks to meter bytes down, `aggregate_train` to validate and merge
sparse replies (or to meter the dense ones), `aggregate_evaluate` to record
federated accuracy.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

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
from dropfleet.fleet.replies import EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, TrainReply, weighted_mean
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder, RoundStats
from dropfleet.server.store.store import NodeEvent
from dropfleet.server.validation import (
    AcceptedUpdate,
    allowed_k,
    check_origin,
    validate_dense_reply,
    validate_evaluate_reply,
    validate_sparse_reply,
)

Checked = TypeVar("Checked")


class _Metered(FedAvg):
    """Counts messages, failures and payload bytes for the round report; screens every reply.

    Instructions carry the round number as Flower's `group_id`, which a reply
    inherits, so a reply to another round's instruction is recognised.
    """

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
        return _tagged(messages, server_round)

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
        return _tagged(messages, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for m in replies:
            if m.has_error():
                log(INFO, "Evaluation error from node %s: %s", m.metadata.src_node_id, m.error.reason)
        accepted = self._screen(
            server_round,
            [m for m in replies if not m.has_error()],
            lambda content: validate_evaluate_reply(content, self.config),
            train=False,
        )
        if not accepted:
            return None
        stats = self.recorder.current(server_round)
        stats.fed_loss = weighted_mean([(r.eval_loss, r.num_examples) for _, r in accepted])
        stats.fed_accuracy = weighted_mean([(r.eval_accuracy, r.num_examples) for _, r in accepted])
        return MetricRecord({EVAL_LOSS: stats.fed_loss, EVAL_ACCURACY: stats.fed_accuracy})

    def _train_replies(
        self, server_round: int, replies: Iterable[Message], check: Callable[[RecordDict], Checked]
    ) -> list[tuple[Message, Checked]]:
        """Count the error replies, then screen the others (see `_screen`)."""
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        stats = self.recorder.current(server_round)
        stats.failed = len(errors)
        stats.failures = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        stats.node_events += [
            NodeEvent(node_id=m.metadata.src_node_id, outcome="failed", error=m.error.reason) for m in errors
        ]
        return self._screen(server_round, [m for m in replies if not m.has_error()], check, train=True)

    def _screen(
        self,
        server_round: int,
        replies: list[Message],
        check: Callable[[RecordDict], Checked],
        train: bool,
    ) -> list[tuple[Message, Checked]]:
        """The replies that pass `check`, in node order; every other one is rejected with its reason.

        Nothing in a reply may stop a round: a check that fails in a way no rule
        foresaw still ends as a rejection (logged with its traceback, to add the rule).
        """
        stats = self.recorder.current(server_round)
        per_node = Counter(m.metadata.src_node_id for m in replies)
        repeated = {node for node, n in per_node.items() if n > 1}
        accepted = []
        # Sorted by node so the merge (a float sum) does not depend on arrival order.
        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            try:
                check_origin(msg, server_round, repeated)
                accepted.append((msg, check(msg.content)))
            except ReplyRejectedError as exc:
                self._reject(stats, msg, str(exc), train)
            except Exception as exc:
                log(ERROR, "Unforeseen failure checking a reply (rejected)", exc_info=True)
                self._reject(stats, msg, f"unreadable reply ({type(exc).__name__}: {exc})"[:300], train)
        return accepted

    @staticmethod
    def _reject(stats: RoundStats, msg: Message, reason: str, train: bool) -> None:
        node = msg.metadata.src_node_id
        kind = "reply" if train else "evaluation reply"
        if train:
            stats.rejected += 1
        stats.failures.append(f"node {node} {kind} rejected: {reason}")
        stats.node_events.append(NodeEvent(node_id=node, outcome="rejected", error=f"{kind}: {reason}"))
        log(WARNING, "Rejected %s from node %s: %s", kind, node, reason)

    @staticmethod
    def _accepted(stats: RoundStats, msg: Message, reply: TrainReply, bytes_up: int) -> None:
        stats.bytes_up += bytes_up
        stats.node_events.append(
            NodeEvent(
                node_id=msg.metadata.src_node_id,
                outcome="accepted",
                bytes_up=bytes_up,
                profile=reply.profile,
                partition_id=reply.partition_id,
                budget_bytes=reply.budget_bytes,
                state_bytes=reply.state_bytes,
                k=reply.k,
            )
        )

    @staticmethod
    def _train_metrics(stats: RoundStats, replies: list[TrainReply]) -> MetricRecord:
        stats.train_loss = weighted_mean([(r.train_loss, r.num_examples) for r in replies])
        return MetricRecord({TRAIN_LOSS: stats.train_loss})


def _tagged(messages: list[Message], server_round: int) -> list[Message]:
    for m in messages:
        m.metadata.group_id = str(server_round)
    return messages


class _SparseReplies(_Metered):
    """Strategies whose clients reply with a sparse model in the dropfleet wire format."""

    def __init__(self, config: RunConfig, recorder: RoundRecorder, **kwargs: object) -> None:
        super().__init__(config, recorder, **kwargs)
        self._short_rounds = 0
        self.max_k = allowed_k(config)

    def _accept(
        self, server_round: int, replies: Iterable[Message], expected: SparseModel
    ) -> list[AcceptedUpdate] | None:
        """Validate sparse replies and count the rejected; None for a short round.

        Too many short rounds in a row raise `RunFailedError`.
        """
        stats = self.recorder.current(server_round)
        checked = self._train_replies(
            server_round,
            replies,
            lambda content: validate_sparse_reply(content, expected, self.config, self.max_k),
        )
        for msg, update in checked:
            self._accepted(stats, msg, update.reply, update.payload_bytes)
        accepted = [update for _, update in checked]
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
            [(u.model, float(u.num_examples)) for u in accepted],
            self.config.global_k_count,
            rule=self.config.aggregation,
            trim=self.config.trim_fraction,
            clip_norm=self.config.clip_norm or None,
        )
        arrays = self._publish(merged)
        stats.churn = churn(previous, self.global_model)
        stats.global_tracked = self.global_model.num_tracked
        log(
            INFO,
            "Round %s: merged %s updates into %s tracked weights",
            server_round,
            len(accepted),
            stats.global_tracked,
        )
        return arrays, self._train_metrics(stats, [u.reply for u in accepted])


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
            [(u.model, float(u.num_examples)) for u in accepted],
            sum(u.model.num_tracked for u in accepted),  # keep every entry: a plain average
        )
        self.update, received, self.residual = sparsify_with_feedback(
            dense_deltas(mean),
            self.residual,
            self.config.global_k_count,
            self.config.model_id,
            self.config.seed,
            self.config.value_precision,
        )
        for name, delta in dense_deltas(received).items():
            self.weights[name] += delta
        self.version += 1
        stats = self.recorder.current(server_round)
        stats.global_tracked = received.num_tracked
        metrics = self._train_metrics(stats, [u.reply for u in accepted])
        return pack_topk_update(self.update, self.version), metrics


class DenseFedAvg(_Metered):
    """Flower's FedAvg on dense weights, metered and screened the same way (the baseline)."""

    def __init__(self, config: RunConfig, recorder: RoundRecorder) -> None:
        super().__init__(config, recorder, arrayrecord_key=DENSE_RECORD)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.recorder.current(server_round)
        checked = self._train_replies(
            server_round, replies, lambda content: validate_dense_reply(content, self.config)
        )
        for msg, reply in checked:
            self._accepted(stats, msg, reply, record_bytes(reply.arrays))
        stats.replied = len(checked)
        if not checked:
            return None, None
        # Flower's weighted average; every content holds exactly one MetricRecord, so its weights are ours.
        arrays = aggregate_arrayrecords([m.content for m, _ in checked], self.weighted_by_key)
        stats.global_tracked = sum(a.numpy().size for a in arrays.values())
        return arrays, self._train_metrics(stats, [r for _, r in checked])
