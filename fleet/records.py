"""How a sparse model rides in a Flower message.

The encoded `SparseModel` (proto/sparse_model.proto) is one `Array` with a
custom serialization type inside an ArrayRecord, so Flower chunks it like any
array and no dense tensor ever travels.
"""

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from dropfleet.common.codec import decode, encode
from dropfleet.common.errors import WireFormatError
from dropfleet.common.sparse import SparseModel

SPARSE_RECORD = "sparse-model"
SPARSE_ARRAY = "model"
SPARSE_STYPE = "dropfleet.v1.SparseModel"
DENSE_RECORD = "arrays"
TOPK_RECORD = "topk-update"
TOPK_VERSION = "version"


def pack_sparse(model: SparseModel, precision: str) -> ArrayRecord:
    """Encode `model` into an ArrayRecord holding one opaque Array."""
    return payload_record(encode(model, precision))


def payload_record(data: bytes) -> ArrayRecord:
    """An ArrayRecord carrying already-encoded sparse model bytes, unchanged."""
    return ArrayRecord(
        {SPARSE_ARRAY: Array(dtype="bytes", shape=(len(data),), stype=SPARSE_STYPE, data=data)}
    )


def sparse_payload(content: RecordDict) -> bytes:
    """The encoded sparse model bytes in a message, or a `WireFormatError`."""
    if list(content.array_records) != [SPARSE_RECORD]:
        raise WireFormatError(
            f"expected exactly one ArrayRecord {SPARSE_RECORD!r}, got {list(content.array_records)}"
        )
    return record_payload(content.array_records[SPARSE_RECORD])


def record_payload(record: ArrayRecord) -> bytes:
    """The encoded sparse model bytes in an ArrayRecord made by `pack_sparse`."""
    if list(record) != [SPARSE_ARRAY]:
        raise WireFormatError(f"expected one Array {SPARSE_ARRAY!r}, got {list(record)}")
    array = record[SPARSE_ARRAY]
    if array.stype != SPARSE_STYPE:
        raise WireFormatError(f"unexpected serialization type {array.stype!r}")
    return bytes(array.data)


def unpack_sparse(content: RecordDict, max_bytes: int) -> SparseModel:
    """Decode and validate the sparse model in a message (untrusted input)."""
    return decode(sparse_payload(content), max_bytes=max_bytes)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (what its arrays put on the wire)."""
    return sum(len(a.data) for a in record.values())


def pack_topk_update(payload: bytes, version: int) -> ArrayRecord:
    """A sparse update (encoded `SparseModel` of update entries) and the model version it leads to."""
    record = payload_record(payload)
    record[TOPK_VERSION] = Array(np.array([version], dtype=np.int64))
    return record


def unpack_topk_update(record: ArrayRecord, max_bytes: int) -> tuple[SparseModel, int]:
    """The update and its version from `pack_topk_update` (untrusted input)."""
    if sorted(record) != sorted([SPARSE_ARRAY, TOPK_VERSION]):
        raise WireFormatError(f"expected arrays {SPARSE_ARRAY!r} and {TOPK_VERSION!r}, got {list(record)}")
    version = record[TOPK_VERSION].numpy()
    if version.shape != (1,) or version.dtype != np.int64 or version[0] < 0:
        raise WireFormatError(f"bad model version {version!r}")
    array = record[SPARSE_ARRAY]
    if array.stype != SPARSE_STYPE:
        raise WireFormatError(f"unexpected serialization type {array.stype!r}")
    return decode(bytes(array.data), max_bytes=max_bytes), int(version[0])
