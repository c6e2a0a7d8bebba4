"""Checking a device's reply completely before it touches the global state.

A reply is data: every way it can be wrong ends as `ReplyRejectedError` with a
reason, which the strategy counts per node while the round goes on. The rules,
besides the reply schema (fleet/replies.py) and the decoder:

- a reply answers the instruction of the current round (Flower's `group_id`,
  which the strategy sets to the round number), and a node replies once;
- the model is the run's (model id, seed, init scheme);
- a sparse reply tracks at most the k it declares, and that k is at most what
  the server allows any device (`allowed_k`);
- every value is finite and within +/- `max-abs-value`, so any average of
  accepted values is representable at the run's precision when re-encoded;
- a dense reply carries exactly the model's tensors, with their shapes and dtypes.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np
from flwr.app import Message, RecordDict

from dropfleet.common.device.budget import BACKENDS
from dropfleet.common.errors import BudgetError, ReplyRejectedError, WireFormatError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.wire.codec import HeldSet, decode
from dropfleet.common.wire.uplink import resolve
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import load_profiles, plan_training
from dropfleet.fleet.records import DENSE_RECORD, SPARSE_RECORD, record_payload
from dropfleet.fleet.replies import EvaluateReply, TrainReply


@dataclass(frozen=True)
class AcceptedUpdate:
    model: SparseModel
    reply: TrainReply
    payload_bytes: int

    @property
    def num_examples(self) -> int:
        return self.reply.num_examples


def check_origin(msg: Message, server_round: int, repeated: set[int]) -> None:
    """The reply answers this round's instruction, from a node that replied only once."""
    if msg.metadata.group_id != str(server_round):
        raise ReplyRejectedError(
            f"reply answers round {msg.metadata.group_id[:20]!r}, not the current round {server_round}"
        )
    if msg.metadata.src_node_id in repeated:
        raise ReplyRejectedError("more than one reply from this node in one round")


def allowed_k(config: RunConfig) -> int:
    """The most tracked weights the server accepts from any device.

    `max-k` from the run config, or else the largest k any known device profile's
    budget gives for this model, with either backend (numba's or NumPy's: the
    server cannot know which a board has; a board stating a larger budget of
    its own needs `max-k`).
    """
    if config.max_k:
        return config.max_k
    return _largest_profile_k(config.model_id, config.batch_size, config.min_k)


@cache
def _largest_profile_k(model_id: str, batch_size: int, min_k: int) -> int:
    ks = []
    for profile in load_profiles().values():
        for streaming_only in (False, True):  # a board may stream by choice, which buys a larger k
            for backend in BACKENDS:
                try:
                    budget = profile.state_budget_bytes
                    plan = plan_training(budget, model_id, batch_size, min_k, streaming_only, backend=backend)
                except BudgetError:
                    continue
                ks.append(plan.k)
    return max(ks, default=min_k)


def _check_values(values: np.ndarray, bound: float, what: str) -> None:
    if values.size and not np.all(np.isfinite(values)):
        raise ReplyRejectedError(f"{what} contain NaN or Inf")
    if values.size and float(np.abs(values).max()) > bound:
        raise ReplyRejectedError(f"{what} exceed max-abs-value {bound:g}")


def validate_sparse_reply(
    content: RecordDict, expected: SparseModel, config: RunConfig, max_k: int, version: int | None = None
) -> AcceptedUpdate:
    """Read and check one sparse training reply against the current global model and run config.

    With `version` (the number of the global `expected` this round sent), a
    change-coded reply against exactly that version is resolved into deltas;
    without it, or against another version, it is rejected.
    """
    reply = TrainReply.from_record(content, SPARSE_RECORD, config.max_examples)
    try:
        payload = record_payload(reply.arrays)
        held = HeldSet(version, expected) if version is not None else None
        model = decode(payload, max_bytes=config.max_payload_bytes, held=held)
    except WireFormatError as exc:
        raise ReplyRejectedError(f"undecodable model: {exc}") from None
    if model.model_id != expected.model_id:
        raise ReplyRejectedError(f"model id {model.model_id!r} != {expected.model_id!r}")
    if model.seed != expected.seed:
        raise ReplyRejectedError(f"seed {model.seed} != run seed {expected.seed}")
    if model.init_scheme != expected.init_scheme:
        raise ReplyRejectedError(f"init scheme {model.init_scheme} != {expected.init_scheme}")
    assert reply.k is not None  # required for sparse replies
    if reply.k > max_k:
        raise ReplyRejectedError(f"declared k {reply.k} > the {max_k} the server allows a device (max-k)")
    if model.num_tracked > reply.k:
        raise ReplyRejectedError(f"{model.num_tracked} tracked values > declared k {reply.k}")
    if model.base_version:
        if version is None:
            raise ReplyRejectedError("change-coded values (base version set) are not accepted here")
        try:
            model = resolve(model, expected, version)
        except WireFormatError as exc:
            raise ReplyRejectedError(str(exc)) from None
    for t in model.tensors:
        _check_values(t.values, config.max_abs_value, f"values of {t.name}")
    return AcceptedUpdate(model=model, reply=reply, payload_bytes=len(payload))


@cache
def _dense_template(model_id: str, seed: int) -> dict[str, tuple[tuple[int, ...], str]]:
    state = seeded_model(model_id, seed).state_dict()
    return {name: (tuple(t.shape), str(t.numpy().dtype)) for name, t in state.items()}


def validate_dense_reply(content: RecordDict, config: RunConfig) -> TrainReply:
    """Read and check one dense (FedAvg baseline) reply: the model's tensors, finite and bounded."""
    reply = TrainReply.from_record(content, DENSE_RECORD, config.max_examples, sparse=False)
    template: Mapping[str, tuple[tuple[int, ...], str]] = _dense_template(config.model_id, config.seed)
    if sorted(reply.arrays) != sorted(template):
        raise ReplyRejectedError(f"dense arrays {sorted(reply.arrays)[:8]} are not the model's tensors")
    for name, (shape, dtype) in template.items():
        array = reply.arrays[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ReplyRejectedError(f"{name}: {array.dtype}{tuple(array.shape)} != {dtype}{shape}")
        try:
            values = array.numpy()
        except Exception as exc:  # bytes from a device: any parse failure is a rejection
            raise ReplyRejectedError(f"{name}: unreadable array: {type(exc).__name__}") from None
        if values.shape != shape:
            raise ReplyRejectedError(f"{name}: data holds {values.size} values for shape {shape}")
        if np.issubdtype(values.dtype, np.floating):
            _check_values(values, config.max_abs_value, f"values of {name}")
    return reply


def validate_evaluate_reply(content: RecordDict, config: RunConfig) -> EvaluateReply:
    return EvaluateReply.from_record(content, config.max_examples)
