"""What every dropfleet strategy shares: round numbering, metering, screening replies, publishing.

A strategy subclasses Flower's `FedAvg`. This base overrides Flower's hooks
once, turning Flower's round (which starts at 1 in every ServerApp) into the
run's round (a resumed run goes on from its checkpoint) in one place, and
calls the subclass's `merge`. Each round it meters the payload bytes, screens
every reply (nothing in a reply may stop a round), and publishes: the
strategy hands the model it holds to server-side evaluation and the
recorder, once, through Flower's evaluation callback.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from logging import ERROR, INFO, WARNING
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from dropfleet.common.data import Split
from dropfleet.common.errors import ReplyRejectedError
from dropfleet.common.train import evaluate
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import record_bytes
from dropfleet.fleet.replies import EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, TrainReply, weighted_mean
from dropfleet.server.reporting import RoundRecorder, RoundStats
from dropfleet.server.store.store import NodeEvent
from dropfleet.server.validation import check_origin, validate_evaluate_reply

Checked = TypeVar("Checked")


@dataclass(frozen=True)
class Evaluation:
    """Server-side evaluation data: the test set, and training examples to re-estimate batch norm."""

    test: Split
    load_calibration: Callable[[], Split]

    @cached_property
    def calibration(self) -> Split:
        return self.load_calibration()


class FleetStrategy(FedAvg):
    """The base: subclasses implement `initial_arrays`, `merge` and `model_for_evaluation`."""

    def __init__(
        self,
        config: RunConfig,
        recorder: RoundRecorder,
        evaluation: Evaluation | None = None,
        round_offset: int = 0,
        **kwargs: object,
    ) -> None:
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
        self.evaluation = evaluation
        # Flower's loop counts rounds from 1; a resumed run goes on from the checkpoint's round.
        self.round_offset = round_offset

    # ----- what a strategy defines ------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        raise NotImplementedError

    def merge(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and merge one round's training replies (`server_round` is the run's round)."""
        raise NotImplementedError

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        """The global model the strategy holds now, as a torch model to evaluate."""
        raise NotImplementedError

    def published_payload(self, arrays: ArrayRecord) -> bytes | None:
        """The bytes the store keeps for this round's model (None: nothing to resume from)."""
        return None

    def published_state(self) -> bytes | None:
        """The server optimizer state the store keeps with the round (None: the strategy has none)."""
        return None

    # ----- the run ------------------------------------------------------------------------
    def run(self, grid: Grid) -> None:
        """Flower's round loop over the rounds left, publishing every round (round 0 too)."""
        if self.evaluation is None:
            raise RuntimeError("a strategy needs its Evaluation to run")
        self.start(
            grid=grid,
            initial_arrays=self.initial_arrays(),
            num_rounds=self.config.num_server_rounds - self.round_offset,
            timeout=self.config.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=self.publish,
        )

    def publish(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's evaluation callback: evaluate the model this strategy holds, publish the round."""
        if self.round_offset and flower_round == 0:
            return None  # the checkpoint's round is published already
        assert self.evaluation is not None
        result = evaluate(self.model_for_evaluation(arrays), self.evaluation.test)
        self.recorder.finish_round(
            self.round_offset + flower_round,
            result.accuracy,
            result.loss,
            self.published_payload(arrays),
            self.published_state(),
        )
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    # ----- Flower's hooks, with the run's round ------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self.tailor(list(super().configure_train(server_round, arrays, config, grid)))
        stats = self.recorder.current(server_round)
        stats.sampled = len(messages)
        _meter_down(stats, messages)
        return _tagged(messages, server_round)

    def tailor(self, messages: list[Message]) -> list[Message]:
        """Per-node instructions where a node needs other content than the rest (default: none)."""
        return messages

    @staticmethod
    def instruction(template: Message, key: str, record: ArrayRecord) -> Message:
        """`template`'s instruction to the same node, carrying `record` under `key` instead of the model."""
        content = RecordDict({key: record, "config": template.content.config_records["config"]})
        return Message(
            content=content,
            dst_node_id=template.metadata.dst_node_id,
            message_type=template.metadata.message_type,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self.tailor(list(super().configure_evaluate(server_round, arrays, config, grid)))
        _meter_down(self.recorder.current(server_round), messages)
        return _tagged(messages, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.merge(server_round + self.round_offset, list(replies))

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

    # ----- screening replies ----------------------------------------------------------------
    def _train_replies(
        self, server_round: int, replies: list[Message], check: Callable[[RecordDict], Checked]
    ) -> list[tuple[Message, Checked]]:
        """Count the error replies, then screen the others (see `_screen`)."""
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
                _reject(stats, msg, str(exc), train)
            except Exception as exc:
                log(ERROR, "Unforeseen failure checking a reply (rejected)", exc_info=True)
                _reject(stats, msg, f"unreadable reply ({type(exc).__name__}: {exc})"[:300], train)
        return accepted


def accepted(stats: RoundStats, msg: Message, reply: TrainReply, bytes_up: int) -> None:
    """Count an accepted training reply, with the device facts it reported, for the fleet view."""
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
            peak_bytes=reply.peak_bytes,
            trainer=reply.trainer,
            k=reply.k,
        )
    )


def train_metrics(stats: RoundStats, replies: list[TrainReply]) -> MetricRecord:
    """The round's examples-weighted training loss, from checked replies only."""
    stats.train_loss = weighted_mean([(r.train_loss, r.num_examples) for r in replies])
    return MetricRecord({TRAIN_LOSS: stats.train_loss})


def _reject(stats: RoundStats, msg: Message, reason: str, train: bool) -> None:
    node = msg.metadata.src_node_id
    kind = "reply" if train else "evaluation reply"
    if train:
        stats.rejected += 1
    stats.failures.append(f"node {node} {kind} rejected: {reason}")
    stats.node_events.append(NodeEvent(node_id=node, outcome="rejected", error=f"{kind}: {reason}"))
    log(WARNING, "Rejected %s from node %s: %s", kind, node, reason)


def _meter_down(stats: RoundStats, messages: list[Message]) -> None:
    for m in messages:
        size = sum(record_bytes(r) for r in m.content.array_records.values())
        stats.bytes_down += size
        stats.node_bytes_down[m.metadata.dst_node_id] = (
            stats.node_bytes_down.get(m.metadata.dst_node_id, 0) + size
        )


def _tagged(messages: list[Message], server_round: int) -> list[Message]:
    """Instructions carry the run's round as Flower's group id; a reply inherits it."""
    for m in messages:
        m.metadata.group_id = str(server_round)
    return messages
