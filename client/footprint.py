"""What a board's processes hold: the peak resident memory (VmHWM) of its SuperNode, its SuperExec
and the ClientApp process reporting, read from Linux's /proc.

A board runs three processes for a round: the SuperNode (connected to the
fleet), the SuperExec (which starts a ClientApp per message) and the ClientApp.
The ClientApp's parent is its SuperExec; its SuperNode is the `flower-supernode`
process serving the runtime API address the ClientApp was started with. Where
one of them cannot be seen (another PID namespace, as in the compose fleet's
separate containers, or /proc mounted with hidepid), the board's total is not
reported rather than undercounted.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Footprint:
    """Peak RSS in bytes: this process's, and the board's (its three processes summed) or None."""

    process_rss_bytes: int | None
    board_rss_bytes: int | None


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident set (VmHWM) in bytes; None where /proc does not say."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _argv(pid: int | str) -> list[str]:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _is(argv: list[str], program: str) -> bool:
    """Whether `program` runs in argv: as the executable, or the script an interpreter runs."""
    return any(Path(a).name == program for a in argv[:2])


def supernode_pid(runtime_address: str) -> int | None:
    """The `flower-supernode` serving `runtime_address` (HOST:PORT), where this process can see it."""
    host, _, port = runtime_address.rpartition(":")
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        argv = _argv(entry.name)
        if _is(argv, "flower-supernode") and _flag(argv, "--port") == port:
            if _flag(argv, "--host") in (None, host, "0.0.0.0", "::"):
                return int(entry.name)
    return None


NOT_A_BOARD = Footprint(None, None)


def board_footprint(argv: list[str] | None = None) -> Footprint:
    """This ClientApp's peak RSS, and with its SuperExec's and SuperNode's the board's.

    `argv`: this process's command line (default: sys.argv). Only a `dropfleet-clientapp`
    process reports: in a simulation the ClientApp shares a Ray worker with others, whose
    memory is not a board's. Its `--runtime-api-address` names its SuperNode's.
    """
    argv = sys.argv if argv is None else argv
    if not _is(argv, "dropfleet-clientapp"):
        return NOT_A_BOARD
    own = peak_rss()
    address = _flag(argv, "--runtime-api-address")
    parent = os.getppid()
    parts = [own]
    if address is None or not _is(_argv(parent), "dropfleet-superexec"):
        parts.append(None)
    else:
        node = supernode_pid(address)
        parts += [peak_rss(parent), peak_rss(node) if node is not None else None]
    counted = [p for p in parts if p is not None]
    return Footprint(own, sum(counted) if len(counted) == len(parts) else None)
