"""An optional ClientApp mod that logs what every message carries.

Set DROPFLEET_MESSAGE_AUDIT=/path/file.jsonl on a SuperNode (or a simulation)
to append one JSON line per message in each direction: its type and, per
array, the record, serialization type, dtype and byte size. Tests use it to
prove that no dense tensor travels; operators can use it to audit bytes.
"""

import json
import os
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


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    path = os.environ.get(AUDIT_ENV)
    if path:
        lines = [
            {"direction": "down", "type": msg.metadata.message_type, "arrays": _arrays(msg)},
            {
                "direction": "up",
                "type": msg.metadata.message_type,
                "error": reply.has_error(),
                "arrays": _arrays(reply),
            },
        ]
        with Path(path).open("a") as fh:
            fh.write("".join(json.dumps(line) + "\n" for line in lines))
    return reply
