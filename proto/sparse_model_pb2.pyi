from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PositionCoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_CODING_UNSPECIFIED: _ClassVar[PositionCoding]
    POSITION_CODING_RICE_SPLIT: _ClassVar[PositionCoding]
    POSITION_CODING_BASE_SET: _ClassVar[PositionCoding]

class ValueEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_ENCODING_UNSPECIFIED: _ClassVar[ValueEncoding]
    VALUE_ENCODING_FP32: _ClassVar[ValueEncoding]
    VALUE_ENCODING_FP16: _ClassVar[ValueEncoding]
    VALUE_ENCODING_INT8: _ClassVar[ValueEncoding]
    VALUE_ENCODING_INT4: _ClassVar[ValueEncoding]
    VALUE_ENCODING_TERNARY: _ClassVar[ValueEncoding]
    VALUE_ENCODING_INT_RICE: _ClassVar[ValueEncoding]
POSITION_CODING_UNSPECIFIED: PositionCoding
POSITION_CODING_RICE_SPLIT: PositionCoding
POSITION_CODING_BASE_SET: PositionCoding
VALUE_ENCODING_UNSPECIFIED: ValueEncoding
VALUE_ENCODING_FP32: ValueEncoding
VALUE_ENCODING_FP16: ValueEncoding
VALUE_ENCODING_INT8: ValueEncoding
VALUE_ENCODING_INT4: ValueEncoding
VALUE_ENCODING_TERNARY: ValueEncoding
VALUE_ENCODING_INT_RICE: ValueEncoding

class SparseTensor(_message.Message):
    __slots__ = ("name", "shape", "count", "position_coding", "rice_parameter", "rice_quotients", "rice_remainders", "value_encoding", "values", "int8_scale", "value_rice_parameter", "value_remainders", "base_removed", "base_added")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    POSITION_CODING_FIELD_NUMBER: _ClassVar[int]
    RICE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    RICE_QUOTIENTS_FIELD_NUMBER: _ClassVar[int]
    RICE_REMAINDERS_FIELD_NUMBER: _ClassVar[int]
    VALUE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INT8_SCALE_FIELD_NUMBER: _ClassVar[int]
    VALUE_RICE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    VALUE_REMAINDERS_FIELD_NUMBER: _ClassVar[int]
    BASE_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    count: int
    position_coding: PositionCoding
    rice_parameter: int
    rice_quotients: bytes
    rice_remainders: bytes
    value_encoding: ValueEncoding
    values: bytes
    int8_scale: float
    value_rice_parameter: int
    value_remainders: bytes
    base_removed: RiceSet
    base_added: RiceSet
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., count: _Optional[int] = ..., position_coding: _Optional[_Union[PositionCoding, str]] = ..., rice_parameter: _Optional[int] = ..., rice_quotients: _Optional[bytes] = ..., rice_remainders: _Optional[bytes] = ..., value_encoding: _Optional[_Union[ValueEncoding, str]] = ..., values: _Optional[bytes] = ..., int8_scale: _Optional[float] = ..., value_rice_parameter: _Optional[int] = ..., value_remainders: _Optional[bytes] = ..., base_removed: _Optional[_Union[RiceSet, _Mapping]] = ..., base_added: _Optional[_Union[RiceSet, _Mapping]] = ...) -> None: ...

class SparseModel(_message.Message):
    __slots__ = ("format_version", "seed", "init_scheme", "model_id", "tensors", "base_version")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INIT_SCHEME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    seed: int
    init_scheme: int
    model_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[SparseTensor]
    base_version: int
    def __init__(self, format_version: _Optional[int] = ..., seed: _Optional[int] = ..., init_scheme: _Optional[int] = ..., model_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[SparseTensor, _Mapping]]] = ..., base_version: _Optional[int] = ...) -> None: ...

class RiceSet(_message.Message):
    __slots__ = ("count", "rice_parameter", "quotients", "remainders")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RICE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    QUOTIENTS_FIELD_NUMBER: _ClassVar[int]
    REMAINDERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    rice_parameter: int
    quotients: bytes
    remainders: bytes
    def __init__(self, count: _Optional[int] = ..., rice_parameter: _Optional[int] = ..., quotients: _Optional[bytes] = ..., remainders: _Optional[bytes] = ...) -> None: ...

class TensorDelta(_message.Message):
    __slots__ = ("name", "shape", "removed", "added", "changes", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    removed: RiceSet
    added: RiceSet
    changes: GridIntegers
    values: GridIntegers
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., removed: _Optional[_Union[RiceSet, _Mapping]] = ..., added: _Optional[_Union[RiceSet, _Mapping]] = ..., changes: _Optional[_Union[GridIntegers, _Mapping]] = ..., values: _Optional[_Union[GridIntegers, _Mapping]] = ...) -> None: ...

class GridIntegers(_message.Message):
    __slots__ = ("shift", "width", "data", "rice", "rice_parameter", "remainders")
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RICE_FIELD_NUMBER: _ClassVar[int]
    RICE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    REMAINDERS_FIELD_NUMBER: _ClassVar[int]
    shift: int
    width: int
    data: bytes
    rice: bool
    rice_parameter: int
    remainders: bytes
    def __init__(self, shift: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ..., rice: _Optional[bool] = ..., rice_parameter: _Optional[int] = ..., remainders: _Optional[bytes] = ...) -> None: ...

class GlobalDelta(_message.Message):
    __slots__ = ("format_version", "seed", "init_scheme", "model_id", "base_version", "version", "grid_exponent", "tensors", "digest")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INIT_SCHEME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRID_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    seed: int
    init_scheme: int
    model_id: str
    base_version: int
    version: int
    grid_exponent: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDelta]
    digest: bytes
    def __init__(self, format_version: _Optional[int] = ..., seed: _Optional[int] = ..., init_scheme: _Optional[int] = ..., model_id: _Optional[str] = ..., base_version: _Optional[int] = ..., version: _Optional[int] = ..., grid_exponent: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorDelta, _Mapping]]] = ..., digest: _Optional[bytes] = ...) -> None: ...
