"""Runs and their rounds: list, inspect, follow (SSE or long-poll), start and stop."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from dropfleet.common.errors import ConfigError, DatasetError
from dropfleet.fleet.config import REST_REFUSED_KEYS
from dropfleet.server import flower_control
from dropfleet.server.api.deps import (
    ConnectionDep,
    FollowersDep,
    SettingsDep,
    StoreDep,
    require_admin,
    require_read,
)
from dropfleet.server.api.schemas import RoundOut, RunOut, StartedRun, StartRun
from dropfleet.server.preflight import check_run, refuse_operator_keys
from dropfleet.server.store.store import LIVE_STATUSES

router = APIRouter(prefix="/v1/runs", tags=["runs"])
RunId = Annotated[str, Path(pattern=r"^[0-9]{1,20}$", description="Flower run id")]
MAX_WAIT_SECONDS = 60


def get_run_or_404(store: StoreDep, run_id: str) -> dict:
    run = store.get_run(run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
    return run


@router.get("", response_model=list[RunOut], dependencies=[Depends(require_read)])
def list_runs(store: StoreDep) -> list[dict]:
    return store.list_runs()


@router.get(
    "/{run_id}",
    response_model=RunOut,
    dependencies=[Depends(require_read)],
    responses={404: {"description": "unknown run"}},
)
def get_run(run_id: RunId, store: StoreDep) -> dict:
    return get_run_or_404(store, run_id)


@router.get(
    "/{run_id}/rounds",
    response_model=list[RoundOut],
    dependencies=[Depends(require_read)],
    responses={404: {"description": "unknown run"}, 503: {"description": "too many followers"}},
)
async def list_rounds(
    run_id: RunId,
    store: StoreDep,
    settings: SettingsDep,
    followers: FollowersDep,
    after: Annotated[int, Query(ge=-1, le=10**6, description="only rounds after this one")] = -1,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="long-poll seconds")] = 0,
) -> list[dict]:
    """Rounds of a run; with `wait`, blocks until a round after `after` exists (long-poll)."""
    await run_in_threadpool(get_run_or_404, store, run_id)
    rounds = await run_in_threadpool(store.rounds, run_id, after)
    if rounds or not wait:
        return rounds
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with followers.slot():  # a long-poll holds a connection like a stream does
        while True:
            await asyncio.sleep(settings.event_poll_seconds)
            rounds = await run_in_threadpool(store.rounds, run_id, after)
            if rounds or loop.time() >= deadline:
                return rounds


@router.get(
    "/{run_id}/events",
    dependencies=[Depends(require_read)],
    responses={
        200: {"content": {"text/event-stream": {}}},
        404: {"description": "unknown run"},
        503: {"description": "too many followers"},
    },
)
async def round_events(
    run_id: RunId,
    store: StoreDep,
    settings: SettingsDep,
    followers: FollowersDep,
    after: Annotated[int, Query(ge=-1, le=10**6)] = -1,
    last_event_id: Annotated[
        str | None, Header(description="sent by EventSource on reconnect: the last round received")
    ] = None,
) -> StreamingResponse:
    """Server-sent events: one `round` event per published round, `end` when the run stops.

    Each event's id is its round, so a reconnecting EventSource (`Last-Event-ID`)
    resumes after the last round it received instead of receiving rounds twice.
    """
    await run_in_threadpool(get_run_or_404, store, run_id)
    if last_event_id is not None and last_event_id.isdigit() and len(last_event_id) <= 7:
        after = max(after, int(last_event_id))

    # The slot is given back when the stream ends or its client goes away (the generator
    # closes), or, should the stream never have started, once the response is done.
    give_back = followers.hold()

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in _events(run_id, store, settings, after):
                yield event
        finally:
            give_back()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(give_back),
    )


async def _events(run_id: str, store: StoreDep, settings: SettingsDep, after: int) -> AsyncIterator[str]:
    """The server-sent events of a run from round `after` on, until it ends."""
    last = after
    while True:
        for r in await run_in_threadpool(store.rounds, run_id, last):
            last = r["round"]
            data = json.dumps(RoundOut(**r).model_dump(mode="json"))
            yield f"event: round\nid: {last}\ndata: {data}\n\n"
        run = await run_in_threadpool(store.get_run, run_id)
        if run is None or run["status"] not in LIVE_STATUSES:
            if not await run_in_threadpool(store.rounds, run_id, last):
                yield f"event: end\ndata: {json.dumps({'status': run['status'] if run else 'gone'})}\n\n"
                return
            continue
        yield ": keep-alive\n\n"
        await asyncio.sleep(settings.event_poll_seconds)


@router.post(
    "",
    response_model=StartedRun,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_admin)],
    responses={
        400: {"description": "invalid run config"},
        401: {"description": "no admin token"},
        502: {"description": "the SuperLink refused or is unreachable"},
        503: {"description": "no SuperLink is configured"},
    },
)
async def start_run(
    body: StartRun, store: StoreDep, settings: SettingsDep, connection: ConnectionDep
) -> StartedRun:
    """Submit a run to the SuperLink (`flwr run`) with run-config overrides.

    The run is known at once (status `starting`) to `GET /runs/{id}` and its
    events; the ServerApp turns it `running`, and a run whose ServerApp never
    records an end is marked `failed` once the SuperLink reports it finished.
    """
    try:
        refuse_operator_keys(body.run_config)
        config = check_run(body.run_config)
    except (ConfigError, DatasetError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    run_id = await run_in_threadpool(
        flower_control.start_run,
        settings.app_dir,
        connection,
        body.run_config,
        settings.flower_env,
        signing_key=settings.app_signing_key,
    )
    await run_in_threadpool(
        store.register_run,
        run_id,
        config.strategy,
        config.model_id,
        config.seed,
        config.num_server_rounds,
        dict(body.run_config),
    )
    return StartedRun(run_id=run_id, attempt=run_id)


@router.post(
    "/{run_id}/resume",
    response_model=StartedRun,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_admin)],
    responses={
        401: {"description": "no admin token"},
        404: {"description": "unknown run"},
        409: {"description": "the run has finished, or its ServerApp may still be alive"},
        502: {"description": "the SuperLink refused or is unreachable"},
        503: {"description": "no SuperLink is configured"},
    },
)
async def resume_run(
    run_id: RunId,
    store: StoreDep,
    settings: SettingsDep,
    connection: ConnectionDep,
    force: Annotated[
        bool, Query(description="stop the previous attempt first if the SuperLink still lists it as live")
    ] = False,
) -> StartedRun:
    """Continue a run whose ServerApp died, from its last published round (a new Flower run)."""
    run = await run_in_threadpool(get_run_or_404, store, run_id)
    if run["status"] == "finished":
        raise HTTPException(status.HTTP_409_CONFLICT, f"run {run_id} has finished")
    # The stored config holds no operator keys (the ServerApp leaves them out), and is checked
    # again as any REST run config is: a store that was written to cannot get a path signed.
    stored = {k: v for k, v in run["config"].items() if k not in REST_REFUSED_KEYS}
    try:
        check_run(stored, data=False)
    except ConfigError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"run {run_id} cannot be resumed: {exc}") from None
    previous = run["attempt"] or run_id
    flower_run = await run_in_threadpool(flower_control.run_status, previous, connection, settings.flower_env)
    if flower_control.is_live(flower_run):
        if not force:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"Flower run {previous} is still {flower_run.get('status')}; wait until the SuperLink "
                "declares it failed (no heartbeat for 60 s), or resume with force=true to stop it first",
            )
        await run_in_threadpool(flower_control.stop_run, previous, connection, settings.flower_env)
    run_config = {**stored, "resume-run": run_id}
    attempt = await run_in_threadpool(
        flower_control.start_run,
        settings.app_dir,
        connection,
        run_config,
        settings.flower_env,
        signing_key=settings.app_signing_key,
    )
    # The new attempt owns the run from now: the old one can no longer publish, and the
    # reconciler judges the run by the new attempt's status.
    await run_in_threadpool(store.hand_over, run_id, attempt)
    return StartedRun(run_id=run_id, attempt=attempt)


@router.post(
    "/{run_id}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_admin)],
    responses={
        401: {"description": "no admin token"},
        404: {"description": "unknown run"},
        502: {"description": "the SuperLink refused or is unreachable"},
        503: {"description": "no SuperLink is configured"},
    },
)
async def stop_run(
    run_id: RunId, store: StoreDep, settings: SettingsDep, connection: ConnectionDep
) -> dict[str, str]:
    """Ask the SuperLink to stop a run (`flwr stop` on the Flower run that carries it now)."""
    run = await run_in_threadpool(get_run_or_404, store, run_id)
    await run_in_threadpool(
        flower_control.stop_run, run["attempt"] or run_id, connection, settings.flower_env
    )
    await run_in_threadpool(store.finish_run, run_id, "stopped")
    return {"run_id": run_id, "status": "stopping"}
