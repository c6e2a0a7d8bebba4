"""Flower's FedAvg on dense weights, metered and screened the same way (the baseline)."""

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from dropfleet.common.layer_init import seeded_model
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import DENSE_RECORD, record_bytes
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.strategies.base import Evaluation, FleetStrategy, accepted, train_metrics
from dropfleet.server.validation import validate_dense_reply


class DenseFedAvg(FleetStrategy):
    def __init__(
        self, config: RunConfig, recorder: RoundRecorder, evaluation: Evaluation | None = None
    ) -> None:
        super().__init__(config, recorder, evaluation, arrayrecord_key=DENSE_RECORD)

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(seeded_model(self.config.model_id, self.config.seed).state_dict())

    def merge(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.recorder.current(server_round)
        checked = self._train_replies(
            server_round, replies, lambda content: validate_dense_reply(content, self.config)
        )
        for msg, reply in checked:
            accepted(stats, msg, reply, record_bytes(reply.arrays))
        stats.replied = len(checked)
        if not checked:
            return None, None
        # Flower's weighted average; every content holds exactly one MetricRecord, so its weights are ours.
        arrays = aggregate_arrayrecords([m.content for m, _ in checked], self.weighted_by_key)
        stats.global_tracked = sum(a.numpy().size for a in arrays.values())
        return arrays, train_metrics(stats, [r for _, r in checked])

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        model = seeded_model(self.config.model_id, self.config.seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model
