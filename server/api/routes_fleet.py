"""The fleet: nodes seen by the aggregator, their profiles, online state from the SuperLink."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from dropfleet.fleet.profiles import DeviceProfile, load_profiles
from dropfleet.server.api.deps import StoreDep, require_read
from dropfleet.server.api.schemas import NodeOut

router = APIRouter(prefix="/v1", tags=["fleet"], dependencies=[Depends(require_read)])


@router.get("/nodes", response_model=list[NodeOut])
async def list_nodes(
    request: Request,
    store: StoreDep,
    online: Annotated[bool, Query(description="ask the SuperLink which nodes are online (cached)")] = False,
) -> list[dict]:
    """Every node that took part, with participation counters and bytes."""
    nodes = await run_in_threadpool(store.nodes)
    if online:
        live = await request.app.state.superlink.online()
        if live is not None:  # None: SuperLink unreachable, online stays unknown (null)
            for n in nodes:
                n["online"] = live.pop(n["node_id"], False)
            now = datetime.now(UTC)
            # Connected nodes that have not taken part in a round yet.
            nodes += [_fresh_node(node_id, is_online, now) for node_id, is_online in sorted(live.items())]
    return nodes


def _fresh_node(node_id: str, online: bool, now: datetime) -> dict:
    """A connected node the aggregator has not heard from: every device fact unknown."""
    counters = {"rounds_joined": 0, "failures": 0, "rejected": 0, "bytes_up": 0, "bytes_down": 0}
    return {
        **dict.fromkeys(NodeOut.model_fields),
        **counters,
        "node_id": node_id,
        "last_seen": now,
        "online": online,
    }


@router.get("/profiles", response_model=list[DeviceProfile])
def list_profiles() -> list[DeviceProfile]:
    """The device profiles a node can run with (fleet/profiles.toml)."""
    return list(load_profiles().values())
