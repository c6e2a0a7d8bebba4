"""Federated DropBack: merge the devices' sparse models, publish the global top-K tracked set."""

from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from torch import nn

from dropfleet.common.codec import decode
from dropfleet.common.merge import churn, next_global
from dropfleet.common.server_opt import ServerAdam, ServerMomentum, ServerOptimizer
from dropfleet.common.sparse import SparseModel, materialize, num_weights
from dropfleet.common.train import recalibrate_batch_norm
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import SPARSE_RECORD, pack_sparse, payload_record, record_payload
from dropfleet.server.checkpoint import Checkpoint
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, train_metrics
from dropfleet.server.strategies.sparse_replies import SparseReplies


class SparseDropBack(SparseReplies):
    """Merges sparse DropBack replies and publishes the global top-K tracked set.

    Between the merge and the top K, an optional server optimizer
    (`server-optimizer`: FedAvgM momentum, FedAdam or FedYogi; `common/server_opt.py`),
    whose state is published with every round and continued by a resumed run.

    It holds the published model decoded (`global_model`, values as devices
    see them) and encoded (`payload`), so evaluation and the store take it
    from here, never decoding the message again.
    """

    def __init__(
        self,
        config: RunConfig,
        recorder: RoundRecorder,
        evaluation: Evaluation | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        super().__init__(
            config, recorder, evaluation, checkpoint.round if checkpoint else 0, arrayrecord_key=SPARSE_RECORD
        )
        self.checkpoint = checkpoint
        self.server_opt = server_optimizer(config) if config.uses_server_optimizer else None
        if checkpoint is not None and self.server_opt is not None:
            if checkpoint.server_state is not None:
                self.server_opt.load(checkpoint.server_state)
                log(INFO, "Resumed the server optimizer's state from round %s", checkpoint.round)
            else:  # a checkpoint published before its optimizer state was kept
                log(WARNING, "Round %s has no server optimizer state: it restarts at zero", checkpoint.round)
        if checkpoint is not None:  # the published bytes exactly, not re-encoded
            self.global_model, self.payload = checkpoint.model, checkpoint.payload
            self.short_rounds = checkpoint.short_rounds
        else:
            self._publish_model(SparseModel.empty(config.model_id, config.seed))

    def published_state(self) -> bytes | None:
        return self.server_opt.state() if self.server_opt is not None else None

    def initial_arrays(self) -> ArrayRecord:
        """The first global model: the bare seed, or the checkpoint's bytes exactly as published."""
        return payload_record(self.payload)

    def _publish_model(self, model: SparseModel) -> ArrayRecord:
        record = pack_sparse(model, self.config.value_precision)
        self.payload = record_payload(record)
        # Keep exactly what devices will decode (values quantized to the wire precision).
        self.global_model = decode(self.payload, self.config.max_payload_bytes)
        return record

    def merge(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # The global sent in round r is version r: change-coded replies are against it.
        updates = self.accept(server_round, replies, self.global_model, version=server_round)
        stats = self.recorder.current(server_round)
        if updates is None:
            stats.global_tracked = self.global_model.num_tracked
            return None, None
        previous = self.global_model
        merged = next_global(
            previous,
            [(u.model, float(u.num_examples)) for u in updates],
            self.config.global_k_count,
            rule=self.config.aggregation,
            trim=self.config.trim_fraction,
            clip_norm=self.config.clip_norm or None,
            server_opt=self.server_opt,
        )
        arrays = self._publish_model(merged)
        stats.churn = churn(previous, self.global_model)
        stats.global_tracked = self.global_model.num_tracked
        log(
            INFO,
            "Round %s: merged %s updates into %s tracked weights",
            server_round,
            len(updates),
            stats.global_tracked,
        )
        return arrays, train_metrics(stats, [u.reply for u in updates])

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
