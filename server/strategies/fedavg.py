"""Flower's FedAvg on dense weights ("fedavg"), metered and screened the same way (the baseline).

Its steps of the round (server/strategies/base.py plays them in order): every
sampled node gets the whole dense model; `aggregate_train` takes the screened
replies (`check_reply`: exactly the model's tensors, finite and bounded) and
averages them with Flower's `aggregate_arrayrecords`, weighted by examples.
"""

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from dropfleet.common.model.torch_model import seeded_model
from dropfleet.fleet.replies import NUM_EXAMPLES, TrainReply
from dropfleet.server.strategies.base import FleetStrategy, Trained
from dropfleet.server.validation import validate_dense_reply


@dataclass(frozen=True)
class DenseUpdate:
    """A checked dense reply, and its content as Flower's average reads it."""

    reply: TrainReply
    content: RecordDict


class DenseFedAvg(FleetStrategy):
    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(seeded_model(self.config.model_id, self.config.seed).state_dict())

    def check_reply(self, content: RecordDict, server_round: int) -> DenseUpdate:
        return DenseUpdate(validate_dense_reply(content, self.config), content)

    def aggregate_train(self, server_round: int, replies: list[Message]) -> Trained[Any]:
        trained = super().aggregate_train(server_round, replies)
        if not trained.updates:
            return trained
        # Flower's weighted average; every content holds exactly one MetricRecord, so its weights are ours.
        arrays = aggregate_arrayrecords([u.content for u in trained.updates], NUM_EXAMPLES)
        return trained.merged(arrays, sum(a.numpy().size for a in arrays.values()))

    def model_for_evaluation(self, arrays: ArrayRecord) -> nn.Module:
        model = seeded_model(self.config.model_id, self.config.seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model
