"""Validation of a client's training reply before it touches the global state."""

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from dropfleet.common.codec import decode
from dropfleet.common.errors import ReplyRejectedError, WireFormatError
from dropfleet.common.sparse import SparseModel
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import sparse_payload

METRICS_RECORD = "metrics"


@dataclass(frozen=True)
class AcceptedUpdate:
    model: SparseModel
    num_examples: int
    payload_bytes: int


def _metric(content: RecordDict, key: str) -> float:
    records = content.metric_records
    if METRICS_RECORD not in records or key not in records[METRICS_RECORD]:
        raise ReplyRejectedError(f"reply lacks metric {key!r}")
    value = records[METRICS_RECORD][key]
    if isinstance(value, list) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ReplyRejectedError(f"metric {key!r} is not a finite number: {value!r}")
    return float(value)


def validate_reply(content: RecordDict, expected: SparseModel, config: RunConfig) -> AcceptedUpdate:
    """Decode and check one reply against the current global model and run config.

    Raises `ReplyRejectedError` naming the first problem found.
    """
    try:
        payload = sparse_payload(content)
        model = decode(payload, max_bytes=config.max_payload_bytes)
    except WireFormatError as exc:
        raise ReplyRejectedError(f"undecodable model: {exc}") from None
    if model.model_id != expected.model_id:
        raise ReplyRejectedError(f"model id {model.model_id!r} != {expected.model_id!r}")
    if model.seed != expected.seed:
        raise ReplyRejectedError(f"seed {model.seed} != run seed {expected.seed}")
    if model.init_scheme != expected.init_scheme:
        raise ReplyRejectedError(f"init scheme {model.init_scheme} != {expected.init_scheme}")
    examples = _metric(content, "num-examples")
    if examples != int(examples) or not 0 < examples <= config.max_examples:
        raise ReplyRejectedError(f"num-examples {examples:g} not an integer in [1, {config.max_examples}]")
    declared_k = _metric(content, "k")
    if model.num_tracked > declared_k:
        raise ReplyRejectedError(f"{model.num_tracked} tracked values > declared k {declared_k:g}")
    if any(not np.all(np.isfinite(t.values)) for t in model.tensors):  # decode checks too
        raise ReplyRejectedError("values contain NaN or Inf")
    return AcceptedUpdate(model=model, num_examples=int(examples), payload_bytes=len(payload))
