"""The round every dropfleet strategy plays, written out as one loop (`FleetStrategy.play_round`).

One round, step by step (open the strategy's own module next, e.g.
server/strategies/dropback.py, for the steps it overrides):

1. configure_train: sample the nodes (Flower's `sample_nodes`) and build one
   instruction each: the global model under the strategy's record key
   (fleet/strategies.py) and the round in its config. A strategy may tailor
   each node's instruction (DropBack's delta downlink, top-k's catch-up).
2. collect: the instructions, tagged with the run's round as Flower's group
   id (a reply inherits it), go out through `grid.send_and_receive`.
3. aggregate_train: `screen_train` checks every reply (`check_reply`, i.e.
   server/validation.py and fleet/replies.py) and returns a `Screened` value:
   the accepted (node, update) pairs, and what became of every other reply.
   The strategy merges the accepted updates and returns a `Trained` value:
   the new global model (or None: unchanged) and the merge's own figures.
   Too many short rounds in a row (`Trained.short`) fail the run.
4. configure_evaluate, collect, aggregate_evaluate: the same for federated
   evaluation, giving an `Evaluated` value.
5. publish: `round_stats` assembles the round's `RoundStats` from those values
   (the one place it is built), the global model is evaluated on the server's
   test set, and the recorder (server/reporting.py) writes the round once: the
   results file, the screen, and the store with the model's bytes and the
   server optimizer state a resumed run continues from.

Round numbers are the run's own: a run resumed from round r's checkpoint plays
r+1 onwards. Nothing in a reply may stop a round: every failed check is a
counted rejection with its reason.
"""

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from logging import ERROR, INFO, WARNING
from typing import Any, Generic, Protocol, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from dropfleet.common.device.data import Split
from dropfleet.common.device.train import evaluate
from dropfleet.common.errors import ReplyRejectedError, RunFailedError
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import record_bytes
from dropfleet.fleet.replies import EvaluateReply, TrainReply, weighted_mean
from dropfleet.fleet.strategies import spec
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder, RoundStats
from dropfleet.server.store.store import NodeEvent
from dropfleet.server.validation import check_origin, validate_evaluate_reply


@dataclass(frozen=True)
class Evaluation:
    """Server-side evaluation data: the test set, and training examples to re-estimate batch norm."""

    test: Split
    load_calibration: Callable[[], Split]

    @cached_property
    def calibration(self) -> Split:
        return self.load_calibration()


class Update(Protocol):
    """An accepted training reply as a strategy keeps it: at least the checked reply itself."""

    @property
    def reply(self) -> TrainReply: ...


C = TypeVar("C")
U = TypeVar("U", bound=Update)


@dataclass(frozen=True)
class Screened(Generic[C]):
    """One round's replies, screened: the accepted ones, and what became of every other one."""

    accepted: list[tuple[int, C]]  # (node id, checked reply), in node order
    failures: list[str] = field(default_factory=list)  # one line per refused reply, with its reason
    events: list[NodeEvent] = field(default_factory=list)  # per node, for the store's fleet view
    failed: int = 0  # error replies (training only)
    rejected: int = 0  # training replies a check refused


@dataclass(frozen=True)
class Trained(Generic[U]):
    """What a round's training gave: the screened replies, and the merge's result."""

    screened: Screened[U]
    arrays: ArrayRecord | None = None  # the new global model's record; None: the global is unchanged
    global_tracked: int = 0
    train_loss: float | None = None
    churn: float = 0.0
    replayed: int = 0  # updates the update memory replayed for devices that sat the round out
    short: bool = False  # too few acceptable replies to merge (see `FleetStrategy._count_short`)

    @property
    def nodes(self) -> list[int]:
        return [node for node, _ in self.screened.accepted]

    @property
    def updates(self) -> list[U]:
        return [update for _, update in self.screened.accepted]

    def merged(self, arrays: ArrayRecord, global_tracked: int, **figures: Any) -> "Trained[U]":
        """This result with a new global model; the training loss is the accepted replies' own."""
        loss = weighted_mean([(u.reply.train_loss, u.reply.num_examples) for u in self.updates])
        return replace(self, arrays=arrays, global_tracked=global_tracked, train_loss=loss, **figures)


@dataclass(frozen=True)
class Evaluated:
    """What a round's federated evaluation gave (no accepted reply: no federated figures)."""

    screened: Screened[EvaluateReply]
    fed_loss: float | None = None
    fed_accuracy: float | None = None


NOT_EVALUATED = Evaluated(Screened(accepted=[]))


class FleetStrategy:
    """The round loop; a strategy (one module each) overrides the steps it needs.

    It defines `initial_arrays`, `check_reply` and `model_for_evaluation`, and
    overrides `aggregate_train` (calling it here first, for the screened
    replies) to merge; `tailor` where a node's instruction differs from the
    rest; `published_payload` / `published_state` where the store keeps what a
    resumed run continues from.
    """

    def __init__(
        self,
        config: RunConfig,
        recorder: RoundRecorder,
        evaluation: Evaluation | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.config = config
        self.spec = spec(config.strategy)
        self.recorder = recorder
        self.evaluation = evaluation
        # A resumed run goes on from its checkpoint's round, with its count of short rounds.
        self.round_offset = checkpoint.round if checkpoint else 0
        self.short_rounds = checkpoint.short_rounds if checkpoint else 0

    # ----- what a strategy defines ------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        raise NotImplementedError

    def check_reply(self, content: RecordDict, server_round: int) -> Update:
        """Read and check one training reply (raise `ReplyRejectedError` with the reason)."""
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
        """Publish the initial model (round 0; a resumed run's round is published already), then
        play the rounds left."""
        if self.evaluation is None:
            raise RuntimeError("a strategy needs its Evaluation to run")
        arrays = self.initial_arrays()
        if not self.round_offset:
            self.publish(RoundStats(round=0, strategy=self.config.strategy), arrays, time.monotonic())
        for server_round in range(self.round_offset + 1, self.config.num_server_rounds + 1):
            arrays = self.play_round(grid, server_round, arrays)

    def play_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """One round: configure, collect, aggregate (training, then evaluation), publish.

        `arrays` is the global model's record the round starts from; the one it ends with is returned.
        """
        started = time.monotonic()
        log(INFO, "[ROUND %s/%s]", server_round, self.config.num_server_rounds)
        train_sent = self.configure_train(server_round, arrays, grid)
        trained = self.aggregate_train(server_round, self.collect(grid, train_sent, server_round))
        self._count_short(server_round, trained, sampled=len(train_sent))
        if trained.arrays is not None:
            arrays = trained.arrays
        eval_sent = self.configure_evaluate(server_round, arrays, grid)
        evaluated = (
            self.aggregate_evaluate(server_round, self.collect(grid, eval_sent, server_round))
            if eval_sent
            else NOT_EVALUATED
        )
        stats = round_stats(self.config.strategy, server_round, train_sent, eval_sent, trained, evaluated)
        self.publish(stats, arrays, started)
        return arrays

    def collect(self, grid: Grid, messages: list[Message], server_round: int) -> list[Message]:
        """Send a round's instructions, tagged with the run's round (a reply inherits the tag)."""
        for m in messages:
            m.metadata.group_id = str(server_round)
        return list(grid.send_and_receive(messages, timeout=self.config.round_timeout))

    def publish(self, stats: RoundStats, arrays: ArrayRecord, started: float) -> RoundStats:
        """Evaluate the model this strategy holds and hand the finished round to the recorder, once."""
        assert self.evaluation is not None
        result = evaluate(self.model_for_evaluation(arrays), self.evaluation.test)
        stats = replace(
            stats,
            accuracy=result.accuracy,
            loss=result.loss,
            seconds=round(time.monotonic() - started, 3),
        )
        return self.recorder.record(stats, self.published_payload(arrays), self.published_state())

    # ----- the steps a strategy may override ------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """The round's training instructions: the global model to a sample of the nodes."""
        nodes = _sample(grid, self.config.fraction_train, self.config.min_train_nodes, self.config)
        log(INFO, "Round %s: sampled %s nodes to train", server_round, len(nodes))
        return self.tailor(self._instructions(nodes, arrays, server_round, MessageType.TRAIN))

    def tailor(self, messages: list[Message]) -> list[Message]:
        """Per-node instructions where a node needs other content than the rest (default: none)."""
        return messages

    def aggregate_train(self, server_round: int, replies: list[Message]) -> Trained[Any]:
        """The screened replies, merged into nothing: a strategy merges `Trained.updates`."""
        return Trained(
            screen_train(server_round, replies, lambda content: self.check_reply(content, server_round))
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """The round's evaluation instructions (none where the strategy's devices do not evaluate)."""
        if self.spec.evaluator is None or not self.config.fraction_evaluate:
            return []
        nodes = _sample(grid, self.config.fraction_evaluate, 1, self.config)
        return self.tailor(self._instructions(nodes, arrays, server_round, MessageType.EVALUATE))

    def aggregate_evaluate(self, server_round: int, replies: list[Message]) -> Evaluated:
        """The examples-weighted federated loss and accuracy of the acceptable evaluation replies."""
        for m in replies:
            if m.has_error():
                log(INFO, "Evaluation error from node %s: %s", m.metadata.src_node_id, m.error.reason)
        screened = _screen(
            server_round,
            [m for m in replies if not m.has_error()],
            lambda content: validate_evaluate_reply(content, self.config),
            train=False,
        )
        if not screened.accepted:
            return Evaluated(screened)
        pairs = [r for _, r in screened.accepted]
        return Evaluated(
            screened,
            fed_loss=weighted_mean([(r.eval_loss, r.num_examples) for r in pairs]),
            fed_accuracy=weighted_mean([(r.eval_accuracy, r.num_examples) for r in pairs]),
        )

    # ----- within the loop ------------------------------------------------------------------------
    def _instructions(
        self, nodes: list[int], arrays: ArrayRecord, server_round: int, message_type: str
    ) -> list[Message]:
        # One RecordDict shared by every node's message, as Flower's FedAvg builds them.
        content = RecordDict(
            {self.spec.record: arrays, "config": ConfigRecord({"server-round": server_round})}
        )
        return [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]

    def _count_short(self, server_round: int, trained: Trained[Any], sampled: int) -> None:
        """A round with too few acceptable replies keeps the global model; `max-short-rounds` of
        them in a row fail the run (a resumed run goes on counting from its checkpoint)."""
        if not trained.short:
            self.short_rounds = 0
            return
        self.short_rounds += 1
        replied = len(trained.screened.accepted)
        log(
            WARNING,
            "Round %s: %s acceptable replies < min-train-nodes %s; the global model is unchanged "
            "(%s such round(s) in a row)",
            server_round,
            replied,
            self.config.min_train_nodes,
            self.short_rounds,
        )
        if self.short_rounds >= self.config.max_short_rounds:
            raise RunFailedError(
                f"{self.short_rounds} rounds in a row had fewer than {self.config.min_train_nodes} "
                f"acceptable replies (last: {replied} of {sampled} sampled)"
            )


def reinstruct(template: Message, key: str, record: ArrayRecord) -> Message:
    """`template`'s instruction to the same node, carrying `record` under `key` instead of the model."""
    content = RecordDict({key: record, "config": template.content.config_records["config"]})
    return Message(
        content=content,
        dst_node_id=template.metadata.dst_node_id,
        message_type=template.metadata.message_type,
    )


def round_stats(
    strategy: str,
    server_round: int,
    train_sent: list[Message],
    eval_sent: list[Message],
    trained: Trained[Any],
    evaluated: Evaluated,
) -> RoundStats:
    """The round's figures, from the values its steps returned (accuracy and loss: `publish`)."""
    node_bytes_down: dict[int, int] = {}
    for m in (*train_sent, *eval_sent):
        size = sum(record_bytes(r) for r in m.content.array_records.values())
        node_bytes_down[m.metadata.dst_node_id] = node_bytes_down.get(m.metadata.dst_node_id, 0) + size
    t, e = trained.screened, evaluated.screened
    return RoundStats(
        round=server_round,
        strategy=strategy,
        sampled=len(train_sent),
        replied=len(t.accepted),
        failed=t.failed,
        rejected=t.rejected,
        bytes_down=sum(node_bytes_down.values()),
        bytes_up=sum(record_bytes(u.reply.arrays) for u in trained.updates),
        global_tracked=trained.global_tracked,
        churn=trained.churn,
        replayed=trained.replayed,
        train_loss=trained.train_loss,
        fed_accuracy=evaluated.fed_accuracy,
        fed_loss=evaluated.fed_loss,
        failures=[*t.failures, *e.failures],
        node_events=[*t.events, *e.events],
        node_bytes_down=node_bytes_down,
    )


# ----- screening replies ----------------------------------------------------------------
def screen_train(
    server_round: int, replies: Iterable[Message], check: Callable[[RecordDict], U]
) -> Screened[U]:
    """A round's training replies: error replies counted as failed, the others screened by `check`
    (see `_screen`), each accepted one with the device facts it reported, for the fleet view."""
    replies = list(replies)
    errors = [m for m in replies if m.has_error()]
    screened = _screen(server_round, [m for m in replies if not m.has_error()], check, train=True)
    return replace(
        screened,
        failed=len(errors),
        failures=[f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors] + screened.failures,
        events=[
            *(
                NodeEvent(node_id=m.metadata.src_node_id, outcome="failed", error=m.error.reason)
                for m in errors
            ),
            *screened.events,
            *(_accepted_event(node, u.reply) for node, u in screened.accepted),
        ],
    )


def _screen(
    server_round: int, replies: list[Message], check: Callable[[RecordDict], C], train: bool
) -> Screened[C]:
    """The replies that pass `check`, in node order; every other one is rejected with its reason.

    Nothing in a reply may stop a round: a check that fails in a way no rule
    foresaw still ends as a rejection (logged with its traceback, to add the rule).
    """
    per_node = Counter(m.metadata.src_node_id for m in replies)
    repeated = {node for node, n in per_node.items() if n > 1}
    accepted: list[tuple[int, C]] = []
    refused: list[tuple[Message, str]] = []
    # Sorted by node so the merge (a float sum) does not depend on arrival order.
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        try:
            check_origin(msg, server_round, repeated)
            accepted.append((msg.metadata.src_node_id, check(msg.content)))
        except ReplyRejectedError as exc:
            refused.append((msg, str(exc)))
        except Exception as exc:
            log(ERROR, "Unforeseen failure checking a reply (rejected)", exc_info=True)
            refused.append((msg, f"unreadable reply ({type(exc).__name__}: {exc})"[:300]))
    kind = "reply" if train else "evaluation reply"
    for msg, reason in refused:
        log(WARNING, "Rejected %s from node %s: %s", kind, msg.metadata.src_node_id, reason)
    return Screened(
        accepted=accepted,
        failures=[f"node {m.metadata.src_node_id} {kind} rejected: {reason}" for m, reason in refused],
        events=[
            NodeEvent(node_id=m.metadata.src_node_id, outcome="rejected", error=f"{kind}: {reason}")
            for m, reason in refused
        ],
        rejected=len(refused) if train else 0,  # a refused evaluation does not count against training
    )


def _accepted_event(node: int, reply: TrainReply) -> NodeEvent:
    return NodeEvent(
        node_id=node,
        outcome="accepted",
        bytes_up=record_bytes(reply.arrays),
        profile=reply.profile,
        partition_id=reply.partition_id,
        budget_bytes=reply.budget_bytes,
        state_bytes=reply.state_bytes,
        peak_bytes=reply.peak_bytes,
        trainer=reply.trainer,
        k=reply.k,
        process_rss_bytes=reply.process_rss_bytes,
        board_rss_bytes=reply.board_rss_bytes,
    )


def _sample(grid: Grid, fraction: float, min_nodes: int, config: RunConfig) -> list[int]:
    """A sample of the connected nodes, as Flower's FedAvg draws it (waiting for enough to connect)."""
    size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
    nodes, _ = sample_nodes(grid, config.min_available_nodes, size)
    return nodes
