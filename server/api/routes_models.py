"""Published global models: protobuf bytes (the wire format) or a JSON summary."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from dropfleet.common.wire.codec import decode
from dropfleet.server.api.deps import StoreDep, require_read
from dropfleet.server.api.routes_runs import RunId, get_run_or_404
from dropfleet.server.api.schemas import ModelSummary, TensorSummary

router = APIRouter(prefix="/v1/runs", tags=["models"], dependencies=[Depends(require_read)])
PROTOBUF = "application/x-protobuf"


@router.get("/{run_id}/models", response_model=list[int], responses={404: {"description": "unknown run"}})
def list_models(run_id: RunId, store: StoreDep) -> list[int]:
    """Rounds for which a global model was published."""
    get_run_or_404(store, run_id)
    return store.model_rounds(run_id)


@router.get(
    "/{run_id}/model",
    response_model=ModelSummary,
    responses={
        200: {"content": {PROTOBUF: {"schema": {"type": "string", "format": "binary"}}}},
        404: {"description": "unknown run or round, or a dense-baseline run"},
    },
)
def get_model(
    run_id: RunId,
    request: Request,
    store: StoreDep,
    round: Annotated[int | None, Query(ge=0, le=10**6, description="default: the latest")] = None,
    format: Annotated[str | None, Query(pattern="^(json|protobuf)$")] = None,
) -> Response | ModelSummary:
    """The latest (or a given round's) published global model.

    `Accept: application/x-protobuf` (or `?format=protobuf`) returns the bytes in
    the wire format of proto/sparse_model.proto; otherwise a JSON summary.
    """
    get_run_or_404(store, run_id)
    row = store.model(run_id, round)
    if row is None:
        what = f"round {round}" if round is not None else "any round"
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} published no model for {what}")
    headers = {"ETag": f'"{row["checksum"]}"', "X-Dropfleet-Round": str(row["round"])}
    wants_protobuf = format == "protobuf" or (
        format is None and PROTOBUF in request.headers.get("accept", "")
    )
    if wants_protobuf:
        return Response(row["data"], media_type=PROTOBUF, headers=headers)
    model = decode(row["data"])
    return ModelSummary(
        run_id=run_id,
        round=row["round"],
        seed=model.seed,
        init_scheme=model.init_scheme,
        model_id=model.model_id,
        k=model.num_tracked,
        num_weights=model.numel,
        size_bytes=row["size"],
        checksum=row["checksum"],
        tensors=[TensorSummary(name=t.name, shape=list(t.shape), tracked=t.count) for t in model.tensors],
    )
