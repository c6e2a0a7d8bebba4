"""The base of strategies whose devices reply with a sparse model in the dropfleet wire format."""

from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log

from dropfleet.common.errors import RunFailedError
from dropfleet.common.sparse import SparseModel
from dropfleet.server.strategies.base import FleetStrategy, accepted
from dropfleet.server.validation import AcceptedUpdate, allowed_k, validate_sparse_reply


class SparseReplies(FleetStrategy):
    """Checks sparse replies against the model they answer, and fails a run that keeps starving.

    A round with fewer than `min-train-nodes` acceptable replies keeps the
    global model; `max-short-rounds` of them in a row fail the run.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.short_rounds = 0
        self.max_k = allowed_k(self.config)
        self.accepted_nodes: list[int] = []  # who sent the updates the last `accept` returned

    def accept(
        self, server_round: int, replies: list[Message], expected: SparseModel, version: int | None = None
    ) -> list[AcceptedUpdate] | None:
        """The acceptable updates of a round, or None for a short round (see the class).

        `version`: the number of the global `expected` (change-coded replies resolve against it).
        """
        stats = self.recorder.current(server_round)
        checked = self._train_replies(
            server_round,
            replies,
            lambda content: validate_sparse_reply(content, expected, self.config, self.max_k, version),
        )
        self.accepted_nodes = [msg.metadata.src_node_id for msg, _ in checked]
        for msg, update in checked:
            accepted(stats, msg, update.reply, update.payload_bytes)
        updates = [update for _, update in checked]
        stats.replied = len(updates)
        if len(updates) >= self.config.min_train_nodes:
            self.short_rounds = 0
            return updates
        self.short_rounds += 1
        log(
            WARNING,
            "Round %s: %s acceptable replies < min-train-nodes %s; the global model is unchanged "
            "(%s such round(s) in a row)",
            server_round,
            len(updates),
            self.config.min_train_nodes,
            self.short_rounds,
        )
        if self.short_rounds >= self.config.max_short_rounds:
            raise RunFailedError(
                f"{self.short_rounds} rounds in a row had fewer than {self.config.min_train_nodes} "
                f"acceptable replies (last: {len(updates)} of {stats.sampled} sampled)"
            )
        return None
