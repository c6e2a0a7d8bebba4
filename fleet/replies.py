"""The replies a device sends, in one place: record names, metric keys and their checks.

The ClientApp builds its replies with `to_record`; the server reads them with
`from_record`, which checks the whole `RecordDict` — which records there are
and of what kind, every metric's type and range, the device facts — and raises
`ReplyRejectedError` naming the first problem. What is inside the model's
ArrayRecord is checked by its own decoder (`codec.decode`, or the dense check in
server/validation.py).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dropfleet.common.device.budget import TRAINERS
from dropfleet.common.errors import ReplyRejectedError

METRICS_RECORD = "metrics"
DEVICE_RECORD = "device"

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
K = "k"
STATE_BYTES = "state-bytes"
PEAK_BYTES = "peak-bytes"
BUDGET_BYTES = "budget-bytes"
# The board's processes' peak resident memory (client/footprint.py): the ClientApp's own, and with
# its SuperExec's and SuperNode's the board's; reported by a board's ClientApp process only.
PROCESS_RSS_BYTES = "process-rss-bytes"
BOARD_RSS_BYTES = "board-rss-bytes"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
PROFILE = "profile"
PARTITION_ID = "partition-id"
TRAINER = "trainer"

# Error codes of refusal replies (Flower reserves small numbers for its own errors).
REFUSED_BUDGET = 4001  # the device's budget cannot hold a training step of the minimum model
UNAVAILABLE = 4002  # the device sits this round out
BAD_REQUEST = 4003  # the instruction was unusable (bad global model, data missing)
OUT_OF_SYNC = 4004  # top-k baseline: the device does not hold the version the update starts from

# Every accepted integer fits a signed 64-bit store column with room to add counters up.
MAX_COUNT = 2**62
MAX_LOSS = 1e6
MAX_PROFILE_CHARS = 64


def _int(metrics: Mapping[str, object], key: str, low: int, high: int, required: bool = True) -> int | None:
    if key not in metrics:
        if required:
            raise ReplyRejectedError(f"reply lacks metric {key!r}")
        return None
    value = metrics[key]
    if type(value) is not int:
        raise ReplyRejectedError(f"metric {key!r} must be an integer, got {value!r:.40}")
    if not low <= value <= high:
        raise ReplyRejectedError(f"metric {key!r} = {value} not in [{low}, {high}]")
    return value


def _float(metrics: Mapping[str, object], key: str, low: float, high: float) -> float:
    if key not in metrics:
        raise ReplyRejectedError(f"reply lacks metric {key!r}")
    value = metrics[key]
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ReplyRejectedError(f"metric {key!r} is not a finite number: {value!r:.40}")
    if not low <= value <= high:
        raise ReplyRejectedError(f"metric {key!r} = {value:g} not in [{low:g}, {high:g}]")
    return float(value)


def _records(content: RecordDict, arrays: tuple[str, ...], configs: tuple[str, ...] = ()) -> None:
    """Exactly the named ArrayRecords and one MetricRecord; at most the named ConfigRecords."""
    if not isinstance(content, RecordDict):
        raise ReplyRejectedError(f"reply content is a {type(content).__name__}, not a RecordDict")
    if sorted(content.array_records) != sorted(arrays):
        raise ReplyRejectedError(
            f"expected exactly ArrayRecord(s) {list(arrays)}, got {list(content.array_records)}"
        )
    if list(content.metric_records) != [METRICS_RECORD]:
        raise ReplyRejectedError(
            f"expected exactly one MetricRecord {METRICS_RECORD!r}, got {list(content.metric_records)}"
        )
    extra = set(content.config_records) - set(configs)
    if extra:
        raise ReplyRejectedError(f"unexpected ConfigRecord(s) {sorted(extra)}")


def _known_keys(record: Mapping[str, object], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(record) - set(known))
    if unknown:
        raise ReplyRejectedError(f"unknown {what} key(s) {unknown[:5]}")


@dataclass(frozen=True)
class TrainReply:
    """A training reply: the model's ArrayRecord, training metrics and self-reported device facts.

    `k`, `state_bytes` (kept between steps), `peak_bytes` (measured in the
    round's first step) and `budget_bytes` are what a sparse (DropBack or
    top-k) device reports, with the `trainer` its budget chose; the dense
    baseline reports none. A board's ClientApp process adds its peak RSS
    (`process_rss_bytes`) and its board's (`board_rss_bytes`: with its
    SuperExec and SuperNode). Device facts are for the fleet view only and
    never trusted for merging.
    """

    arrays: ArrayRecord
    num_examples: int
    train_loss: float
    array_key: str
    k: int | None = None
    state_bytes: int | None = None
    budget_bytes: int | None = None
    profile: str | None = None
    partition_id: int | None = None
    peak_bytes: int | None = None
    trainer: str | None = None
    process_rss_bytes: int | None = None
    board_rss_bytes: int | None = None

    def to_record(self) -> RecordDict:
        metrics: dict[str, int | float] = {NUM_EXAMPLES: self.num_examples, TRAIN_LOSS: self.train_loss}
        optional = (
            (K, self.k),
            (STATE_BYTES, self.state_bytes),
            (PEAK_BYTES, self.peak_bytes),
            (BUDGET_BYTES, self.budget_bytes),
            (PROCESS_RSS_BYTES, self.process_rss_bytes),
            (BOARD_RSS_BYTES, self.board_rss_bytes),
        )
        for key, value in optional:
            if value is not None:
                metrics[key] = value
        content = RecordDict({self.array_key: self.arrays, METRICS_RECORD: MetricRecord(metrics)})
        device = {
            key: value
            for key, value in (
                (PROFILE, self.profile),
                (PARTITION_ID, self.partition_id),
                (TRAINER, self.trainer),
            )
            if value is not None
        }
        if device:
            content[DEVICE_RECORD] = ConfigRecord(device)
        return content

    @classmethod
    def from_record(
        cls, content: RecordDict, array_key: str, max_examples: int, sparse: bool = True
    ) -> "TrainReply":
        """Check and read an untrusted training reply (`sparse`: k is required)."""
        _records(content, (array_key,), (DEVICE_RECORD,))
        metrics = content.metric_records[METRICS_RECORD]
        _known_keys(
            metrics,
            (
                NUM_EXAMPLES,
                TRAIN_LOSS,
                K,
                STATE_BYTES,
                PEAK_BYTES,
                BUDGET_BYTES,
                PROCESS_RSS_BYTES,
                BOARD_RSS_BYTES,
            ),
            "metric",
        )
        device = content.config_records.get(DEVICE_RECORD, ConfigRecord())
        _known_keys(device, (PROFILE, PARTITION_ID, TRAINER), "device")
        profile = device.get(PROFILE)
        if profile is not None and not (isinstance(profile, str) and 0 < len(profile) <= MAX_PROFILE_CHARS):
            raise ReplyRejectedError(
                f"device {PROFILE!r} must be a string of 1 to {MAX_PROFILE_CHARS} characters"
            )
        trainer = device.get(TRAINER)
        if trainer is not None and trainer not in TRAINERS:
            raise ReplyRejectedError(
                f"device {TRAINER!r} must be one of {list(TRAINERS)}, got {trainer!r:.40}"
            )
        return cls(
            arrays=content.array_records[array_key],
            num_examples=_int(metrics, NUM_EXAMPLES, 1, max_examples),
            train_loss=_float(metrics, TRAIN_LOSS, 0.0, MAX_LOSS),
            array_key=array_key,
            k=_int(metrics, K, 1, MAX_COUNT, required=sparse),
            state_bytes=_int(metrics, STATE_BYTES, 0, MAX_COUNT, required=False),
            budget_bytes=_int(metrics, BUDGET_BYTES, 0, MAX_COUNT, required=False),
            profile=profile,
            partition_id=_int(device, PARTITION_ID, 0, MAX_COUNT, required=False),
            peak_bytes=_int(metrics, PEAK_BYTES, 0, MAX_COUNT, required=False),
            trainer=trainer,
            process_rss_bytes=_int(metrics, PROCESS_RSS_BYTES, 0, MAX_COUNT, required=False),
            board_rss_bytes=_int(metrics, BOARD_RSS_BYTES, 0, MAX_COUNT, required=False),
        )


@dataclass(frozen=True)
class EvaluateReply:
    """A federated-evaluation reply: loss and accuracy on the device's held-out examples."""

    num_examples: int
    eval_loss: float
    eval_accuracy: float

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                METRICS_RECORD: MetricRecord(
                    {
                        NUM_EXAMPLES: self.num_examples,
                        EVAL_LOSS: self.eval_loss,
                        EVAL_ACCURACY: self.eval_accuracy,
                    }
                )
            }
        )

    @classmethod
    def from_record(cls, content: RecordDict, max_examples: int) -> "EvaluateReply":
        """Check and read an untrusted evaluation reply."""
        _records(content, ())
        metrics = content.metric_records[METRICS_RECORD]
        _known_keys(metrics, (NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY), "metric")
        return cls(
            num_examples=_int(metrics, NUM_EXAMPLES, 1, max_examples),
            eval_loss=_float(metrics, EVAL_LOSS, 0.0, MAX_LOSS),
            eval_accuracy=_float(metrics, EVAL_ACCURACY, 0.0, 1.0),
        )


def weighted_mean(pairs: list[tuple[float, int]]) -> float:
    """Examples-weighted mean of (value, examples) pairs (examples are >= 1 after checking)."""
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
