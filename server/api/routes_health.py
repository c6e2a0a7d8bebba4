"""Liveness and readiness."""

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from dropfleet.server.api.deps import StoreDep
from dropfleet.server.api.schemas import Health

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process answers."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"description": "store unreachable"}})
async def ready(store: StoreDep) -> Health:
    """The store answers: the API can serve."""
    try:
        await run_in_threadpool(store.ping)
    except Exception as exc:  # any driver error means "not ready"
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"store unavailable: {type(exc).__name__}"
        ) from None
    return Health(status="ready")
