"""The sparsified-FedAvg baseline: dense models, top-k updates with error feedback both ways."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from dropfleet.common.codec import encode
from dropfleet.common.layer_init import seeded_model
from dropfleet.common.merge import merge_sparse
from dropfleet.common.sparse import SparseModel, dense_deltas
from dropfleet.common.topk import sparsify_with_feedback, zeros
from dropfleet.common.train import recalibrate_batch_norm
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import TOPK_RECORD, pack_topk_update
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, train_metrics
from dropfleet.server.strategies.sparse_replies import SparseReplies


class TopKFedAvg(SparseReplies):
    """Clients keep the dense global model and their residual in their node state
    and send back the top-k of their update (k from their memory budget, as a
    DropBack device); the server averages them, adds its own residual and
    sends the top global-k of that, tagged with the model version it leads to
    (STC-style; every client must take part in every round to stay in sync).
    """

    def __init__(
        self, config: RunConfig, recorder: RoundRecorder, evaluation: Evaluation | None = None
    ) -> None:
        super().__init__(config, recorder, evaluation, arrayrecord_key=TOPK_RECORD)
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
    ) -> list[Message]:
        return []  # a baseline for the byte race: the server evaluates the global model centrally

    def merge(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.accept(server_round, replies, self.expected)
        if updates is None:
            return None, None
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
        stats = self.recorder.current(server_round)
        stats.global_tracked = received.num_tracked
        return pack_topk_update(self.update, self.version), train_metrics(stats, [u.reply for u in updates])

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        model = seeded_model(self.config.model_id, self.config.seed)
        weights = {n: torch.from_numpy(w.copy()) for n, w in self.weights.items()}
        model.load_state_dict(weights, strict=False)  # parameters; BN statistics do not travel
        assert self.evaluation is not None
        recalibrate_batch_norm(model, self.evaluation.calibration)
        return model
