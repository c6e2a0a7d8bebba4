"""How a sparse model rides in a Flower message.

The encoded `SparseModel` (proto/sparse_model.proto) is one `Array` with a
custom serialization type inside an ArrayRecord, so Flower chunks it like any
array and no dense tensor ever travels.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from dropfleet.common.errors import WireFormatError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import decode, encode

SPARSE_RECORD = "sparse-model"
SPARSE_ARRAY = "model"
SPARSE_STYPE = "dropfleet.v1.SparseModel"
GLOBAL_DELTA_RECORD = "global-delta"
GLOBAL_DELTA_STYPE = "dropfleet.v1.GlobalDelta"
DENSE_RECORD = "arrays"
TOPK_RECORD = "topk-update"
TOPK_MODEL_RECORD = "topk-full-model"
TOPK_VERSION = "version"
TOPK_EARLIER = "earlier-"


def pack_sparse(model: SparseModel, precision: str) -> ArrayRecord:
    """Encode `model` into an ArrayRecord holding one opaque Array."""
    return payload_record(encode(model, precision))


def payload_record(data: bytes, stype: str = SPARSE_STYPE) -> ArrayRecord:
    """An ArrayRecord carrying already-encoded bytes (a sparse model, or a `GlobalDelta`), unchanged."""
    return ArrayRecord({SPARSE_ARRAY: Array(dtype="bytes", shape=(len(data),), stype=stype, data=data)})


def sparse_payload(content: RecordDict) -> bytes:
    """The encoded sparse model bytes in a message, or a `WireFormatError`."""
    if list(content.array_records) != [SPARSE_RECORD]:
        raise WireFormatError(
            f"expected exactly one ArrayRecord {SPARSE_RECORD!r}, got {list(content.array_records)}"
        )
    return record_payload(content.array_records[SPARSE_RECORD])


def record_payload(record: ArrayRecord, stype: str = SPARSE_STYPE) -> bytes:
    """The encoded bytes of type `stype` in an ArrayRecord made by `payload_record`."""
    if list(record) != [SPARSE_ARRAY]:
        raise WireFormatError(f"expected one Array {SPARSE_ARRAY!r}, got {list(record)}")
    array = record[SPARSE_ARRAY]
    if array.stype != stype:
        raise WireFormatError(f"unexpected serialization type {array.stype!r}")
    return bytes(array.data)


def unpack_sparse(content: RecordDict, max_bytes: int) -> SparseModel:
    """Decode and validate the sparse model in a message (untrusted input)."""
    return decode(sparse_payload(content), max_bytes=max_bytes)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (what its arrays put on the wire)."""
    return sum(len(a.data) for a in record.values())


def pack_topk_update(payload: bytes, version: int, earlier: Sequence[bytes] = ()) -> ArrayRecord:
    """A sparse update (encoded `SparseModel` of update entries) and the model version it leads to.

    `earlier`: the updates before it, oldest first (a device that missed rounds catches up).
    """
    record = payload_record(payload)
    for i, data in enumerate(earlier):
        record[f"{TOPK_EARLIER}{i}"] = Array(dtype="bytes", shape=(len(data),), stype=SPARSE_STYPE, data=data)
    record[TOPK_VERSION] = Array(np.array([version], dtype=np.int64))
    return record


def pack_topk_model(weights: Mapping[str, np.ndarray], version: int) -> ArrayRecord:
    """The whole dense model at `version`: for a device that holds no version it can update from."""
    record = ArrayRecord({name: Array(np.ascontiguousarray(w)) for name, w in weights.items()})
    record[TOPK_VERSION] = Array(np.array([version], dtype=np.int64))
    return record


def unpack_topk_model(
    record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], int]:
    """The dense weights and version from `pack_topk_model` (untrusted input: names, shapes, finite)."""
    if sorted(record) != sorted([*shapes, TOPK_VERSION]):
        raise WireFormatError(f"expected the model's tensors and {TOPK_VERSION!r}, got {sorted(record)[:8]}")
    weights = {}
    for name, shape in shapes.items():
        array = record[name]
        if array.dtype != "float32" or tuple(array.shape) != shape:
            raise WireFormatError(f"{name}: {array.dtype}{tuple(array.shape)} is not float32{shape}")
        values = array.numpy()
        if values.shape != shape or not np.all(np.isfinite(values)):
            raise WireFormatError(f"{name}: malformed or non-finite values")
        weights[name] = values.copy()
    return weights, _version(record)


def _version(record: ArrayRecord) -> int:
    version = record[TOPK_VERSION].numpy()
    if version.shape != (1,) or version.dtype != np.int64 or version[0] < 0:
        raise WireFormatError(f"bad model version {version!r}")
    return int(version[0])


def unpack_topk_update(record: ArrayRecord, max_bytes: int) -> tuple[list[SparseModel], int]:
    """The updates, oldest first, and the version the last leads to, from `pack_topk_update`."""
    earlier = len(record) - 2
    names = [*(f"{TOPK_EARLIER}{i}" for i in range(earlier)), SPARSE_ARRAY]
    if earlier < 0 or sorted(record) != sorted([*names, TOPK_VERSION]):
        raise WireFormatError(f"expected arrays {[*names, TOPK_VERSION]}, got {list(record)[:8]}")
    version = _version(record)
    if version < earlier:
        raise WireFormatError(f"{earlier + 1} updates cannot lead to version {version}")
    updates = []
    for name in names:
        array = record[name]
        if array.stype != SPARSE_STYPE:
            raise WireFormatError(f"unexpected serialization type {array.stype!r}")
        updates.append(decode(bytes(array.data), max_bytes=max_bytes))
    return updates, version
