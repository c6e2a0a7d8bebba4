"""The sparsified-FedAvg baseline ("topk-ef"): dense models, top-k updates with error feedback both ways.

Its steps of the round (server/strategies/base.py plays them in order):
`tailor` sends each training node the update to the current version, after
the ones it missed, or the whole dense model; `aggregate_train`
takes the screened replies (`check_reply`: sparse top-k updates), notes the
version each accepted node now holds, averages the updates and sends the top
global-k of that plus the server's residual as the next version. Devices do
not evaluate (fleet/strategies.py): the server evaluates the dense model.
"""

from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from dropfleet.common.aggregate.merge import merge_sparse
from dropfleet.common.device.train import recalibrate_batch_norm
from dropfleet.common.model.sparse import SparseModel, dense_deltas
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.wire.codec import encode
from dropfleet.common.wire.topk import sparsify_with_feedback, zeros
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import TOPK_MODEL_RECORD, TOPK_RECORD, pack_topk_model, pack_topk_update
from dropfleet.fleet.replies import OUT_OF_SYNC
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, FleetStrategy, Trained, reinstruct
from dropfleet.server.validation import AcceptedUpdate, allowed_k, validate_sparse_reply


class TopKFedAvg(FleetStrategy):
    """Clients keep the dense global model and their residual in their node state
    and send back the top-k of their update (k from their memory budget, as a
    DropBack device); the server averages them, adds its own residual and
    sends the top global-k of that, tagged with the model version it leads to
    (STC-style). A client that missed rounds gets the updates it missed before
    this one, or the whole dense model when that is smaller or it holds no
    version the server knows of (a new client, or one that reported itself
    out of sync), so the baseline also runs on a fleet whose devices miss rounds.
    A round with fewer than `min-train-nodes` acceptable replies keeps the model.
    """

    def __init__(
        self, config: RunConfig, recorder: RoundRecorder, evaluation: Evaluation | None = None
    ) -> None:
        super().__init__(config, recorder, evaluation)
        self.max_k = allowed_k(config)
        model = seeded_model(config.model_id, config.seed)
        self.weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        self.residual = zeros(config.model_id)
        self.expected = SparseModel.empty(config.model_id, config.seed)
        self.version = 0
        self.update = encode(self.expected, config.value_precision)
        # version -> the update that led to it, only as far back as a catch-up can reach: a node
        # further behind gets the whole model anyway (`tailor`), so older updates are dropped.
        self.history: dict[int, bytes] = {}
        self.held: dict[int, int] = {}  # node id -> the version it holds, per its accepted replies
        self.dense_bytes = 4 * sum(w.size for w in self.weights.values())
        self._dense: tuple[int, ArrayRecord] | None = None  # the whole model, built once per version

    def initial_arrays(self) -> ArrayRecord:
        return pack_topk_update(self.update, self.version)

    def tailor(self, messages: list[Message]) -> list[Message]:
        """Catch-up content for nodes that do not hold the version before this one."""
        out = []
        for m in messages:
            held = self.held.get(m.metadata.dst_node_id)
            if self.version == 0 or held == self.version - 1:
                out.append(m)
                continue
            missed = None if held is None else range(held + 1, self.version)
            if missed is not None and all(v in self.history for v in missed):
                earlier = [self.history[v] for v in missed]
                if sum(map(len, earlier)) + len(self.update) <= self.dense_bytes:
                    out.append(
                        reinstruct(m, TOPK_RECORD, pack_topk_update(self.update, self.version, earlier))
                    )
                    continue
            out.append(reinstruct(m, TOPK_MODEL_RECORD, self._dense_model()))
        return out

    def _dense_model(self) -> ArrayRecord:
        """The whole model at this version: one record however many nodes lag (Flower shares it)."""
        if self._dense is None or self._dense[0] != self.version:
            self._dense = (self.version, pack_topk_model(self.weights, self.version))
        return self._dense[1]

    def _prune_history(self) -> None:
        """Keep only the updates a catch-up may still send: newer than what every known node
        holds, and no more of them than fit in the whole model's bytes (`tailor` sends the
        whole model past that), so the history is bounded by the model's size, not the run's."""
        oldest_needed = min(self.held.values(), default=self.version) + 1
        total = len(self.update)  # a catch-up carries this version's update too
        reachable = True
        for v in sorted(self.history, reverse=True):
            if v == self.version:
                continue
            total += len(self.history[v])
            reachable = reachable and v >= oldest_needed and total <= self.dense_bytes
            if not reachable:  # and so is every older one: a catch-up needs all versions since
                del self.history[v]

    def check_reply(self, content: RecordDict, server_round: int) -> AcceptedUpdate:
        return validate_sparse_reply(content, self.expected, self.config, self.max_k)

    def aggregate_train(self, server_round: int, replies: list[Message]) -> Trained[Any]:
        for m in replies:
            if m.has_error() and m.error.code == OUT_OF_SYNC:
                self.held.pop(m.metadata.src_node_id, None)  # it gets the whole model next time
        trained = super().aggregate_train(server_round, replies)
        for node in trained.nodes:
            self.held[node] = self.version  # it applied what it was sent, then trained
        updates = trained.updates
        if len(updates) < self.config.min_train_nodes:
            return replace(trained, short=True)
        mean = merge_sparse(
            [(u.model, float(u.num_examples)) for u in updates],
            sum(u.model.num_tracked for u in updates),  # keep every entry: a plain average
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
        self.history[self.version] = self.update
        self._prune_history()
        return trained.merged(pack_topk_update(self.update, self.version), received.num_tracked)

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        model = seeded_model(self.config.model_id, self.config.seed)
        weights = {n: torch.from_numpy(w.copy()) for n, w in self.weights.items()}
        model.load_state_dict(weights, strict=False)  # parameters; BN statistics do not travel
        assert self.evaluation is not None
        recalibrate_batch_norm(model, self.evaluation.calibration)
        return model
