"""The fleet: nodes seen by the aggregator, their profiles, online state from the SuperLink."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from dropfleet.client.profiles import load_profiles
from dropfleet.common.errors import FlowerControlError
from dropfleet.server import flower_control
from dropfleet.server.api.deps import SettingsDep, StoreDep, require_read
from dropfleet.server.api.schemas import NodeOut, ProfileOut

router = APIRouter(prefix="/v1", tags=["fleet"], dependencies=[Depends(require_read)])


@router.get("/nodes", response_model=list[NodeOut])
async def list_nodes(
    store: StoreDep,
    settings: SettingsDep,
    online: Annotated[bool, Query(description="ask the SuperLink which nodes are online")] = False,
) -> list[dict]:
    """Every node that took part, with participation counters and bytes."""
    nodes = await run_in_threadpool(store.nodes)
    if online:
        try:
            listed = await run_in_threadpool(
                flower_control.list_supernodes, settings.flower_connection, settings.flower_env
            )
        except FlowerControlError:
            listed = None
        if listed is not None:
            entries = listed.get("nodes", listed) if isinstance(listed, dict) else listed
            live = {
                str(n.get("node-id", n.get("node_id"))): str(n.get("status", "")).lower()
                for n in entries
                if isinstance(n, dict)
            }
            for n in nodes:
                n["online"] = live.get(n["node_id"]) in ("online", "active", "connected")
    return nodes


@router.get("/profiles", response_model=list[ProfileOut])
def list_profiles() -> list[dict]:
    """The device profiles a node can run with (client/profiles.toml)."""
    return [p.__dict__ for p in load_profiles().values()]
