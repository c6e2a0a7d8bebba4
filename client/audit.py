"""An optional ClientApp mod that logs what every message carries.

Set the run config `message-audit=/path/file.jsonl` (or DROPFLEET_MESSAGE_AUDIT on a
SuperNode) to append one JSON line per message in each direction: its type and, per
array, the record, serialization type, dtype and byte size, and the Ray node that ran
the ClientApp in a simulation. Tests use it to prove that no dense tensor travels and
where ClientApps ran; operators can use it to audit bytes.
"""

import json
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

AUDIT_ENV = "DROPFLEET_MESSAGE_AUDIT"


def _arrays(msg: Message) -> list[dict[str, object]]:
    if msg.has_error():
        return []
    return [
        {"record": rname, "array": aname, "stype": a.stype, "dtype": a.dtype, "bytes": len(a.data)}
        for rname, record in msg.content.array_records.items()
        for aname, a in record.items()
    ]


def _ray_node() -> str | None:
    """The Ray node running this ClientApp (simulation actors), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    path = str(context.run_config.get("message-audit", "")) or os.environ.get(AUDIT_ENV)
    if path:
        node = _ray_node()
        lines = [
            {
                "direction": "down",
                "type": msg.metadata.message_type,
                "arrays": _arrays(msg),
                "ray_node": node,
            },
            {
                "direction": "up",
                "type": msg.metadata.message_type,
                "error": reply.has_error(),
                "arrays": _arrays(reply),
                "ray_node": node,
            },
        ]
        with Path(path).open("a") as fh:
            fh.write("".join(json.dumps(line) + "\n" for line in lines))
    return reply
