"""Response and request bodies of the REST API."""

from typing import Any

from pydantic import BaseModel, Field, create_model

from dropfleet.server.store.schema import Base, Node, Round, Run


def _from_table(table: type[Base], name: str, **extra: Any) -> type[BaseModel]:
    """A response model with one field per column: type, nullability and `doc` from the ORM table."""
    fields: dict[str, Any] = {}
    for column in table.__table__.columns:
        annotation: Any = column.type.python_type
        default: Any = ...
        if column.nullable:
            annotation, default = annotation | None, None
        elif column.default is not None and column.default.is_scalar:
            default = column.default.arg
        fields[column.name] = (annotation, Field(default, description=column.doc))
    return create_model(name, **fields, **extra)


RunOut = _from_table(Run, "RunOut")
RoundOut = _from_table(Round, "RoundOut")
NodeOut = _from_table(
    Node,
    "NodeOut",
    online=(bool | None, Field(None, description="per the SuperLink, when it could be asked")),
)


class TensorSummary(BaseModel):
    name: str
    shape: list[int]
    tracked: int


class ModelSummary(BaseModel):
    run_id: str
    round: int
    seed: int
    init_scheme: int
    model_id: str
    k: int = Field(description="tracked weights in this published global set")
    num_weights: int
    size_bytes: int
    checksum: str = Field(description="SHA-256 of the protobuf bytes")
    tensors: list[TensorSummary]


class StartRun(BaseModel):
    model_config = {"extra": "forbid"}

    run_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="run-config overrides (kebab-case keys)", max_length=64
    )


class StartedRun(BaseModel):
    run_id: str
    attempt: str = Field(description="the Flower run now carrying it (equals run_id unless resumed)")


class Health(BaseModel):
    status: str
