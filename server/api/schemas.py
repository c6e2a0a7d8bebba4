"""Response and request bodies of the REST API."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class RunOut(BaseModel):
    run_id: str
    strategy: str
    model_id: str
    seed: int
    num_rounds: int
    status: str
    config: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    attempt: str | None = Field(None, description="the Flower run whose ServerApp owns this run now")
    resumes: int = Field(0, description="how many times the run was resumed after its ServerApp stopped")


class RoundOut(BaseModel):
    run_id: str
    round: int
    accuracy: float | None
    loss: float | None
    fed_accuracy: float | None
    fed_loss: float | None
    train_loss: float | None
    sampled: int
    replied: int
    failed: int
    rejected: int
    bytes_up: int
    bytes_down: int
    tracked: int
    churn: float
    seconds: float
    created_at: datetime


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


class NodeOut(BaseModel):
    node_id: str
    profile: str | None
    partition_id: int | None
    budget_bytes: int | None
    state_bytes: int | None = Field(None, description="model-state bytes the device last reported")
    k: int | None
    last_seen: datetime
    rounds_joined: int
    failures: int
    rejected: int
    bytes_up: int
    bytes_down: int
    last_error: str | None
    online: bool | None = Field(None, description="per the SuperLink, when it could be asked")


class ProfileOut(BaseModel):
    name: str
    memory_bytes: int
    state_budget_bytes: int
    cpus: float
    speed: float
    availability: float


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
