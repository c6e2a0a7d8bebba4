"""Per-round report: a progress display on screen, JSON lines for scripts, the store for the API."""

import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dropfleet.common.errors import ConfigError
from dropfleet.server.store.store import NodeEvent, Store


@dataclass
class RoundStats:
    round: int
    strategy: str
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    global_tracked: int = 0
    churn: float = 0.0
    replayed: int = 0  # updates the update memory replayed for devices that sat the round out
    train_loss: float | None = None
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    # Per node, for the store's fleet view (not in the JSON lines).
    node_events: list[NodeEvent] = field(default_factory=list, metadata={"report": False})
    node_bytes_down: dict[int, int] = field(default_factory=dict, metadata={"report": False})

    def report(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("report", True)}

    def fleet_events(self) -> list[NodeEvent]:
        """Node events with the bytes each node was sent; silent nodes count as failed."""
        seen = {ev.node_id for ev in self.node_events}
        events = [
            NodeEvent(**{**ev.__dict__, "bytes_down": self.node_bytes_down.get(ev.node_id, 0)})
            for ev in self.node_events
        ]
        events += [
            NodeEvent(node_id=n, outcome="failed", bytes_down=b, error="no reply before the timeout")
            for n, b in self.node_bytes_down.items()
            if n not in seen
        ]
        return events


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_results(path: str | Path) -> dict[str, Any]:
    """The latest run in a results file: its header, round lines and end line (None while running).

    Runs that share a file follow one another (a run appends, it never truncates), each from
    its `header` line; a resumed run goes on after a `resume` line within its own section.
    """
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    starts = [i for i, x in enumerate(lines) if x.get("type") == "header"]
    lines = lines[starts[-1] :] if starts else lines
    return {
        "header": next((x for x in lines if x.get("type") == "header"), None),
        "rounds": [x for x in lines if x.get("type") == "round"],
        "end": lines[-1] if lines and lines[-1].get("type") == "end" else None,
    }


def open_results_file(path: Path) -> TextIO:
    """The results file, opened once for appending: a run never truncates it, and never writes
    through a symbolic link or into another kind of file.

    The checks are made on the open file itself (no window between a check and a later open by
    name): a symlink, a directory, a FIFO or device, or an existing file whose first line is not
    a dropfleet results line (a database, a log, a key) is refused before a byte is written.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        why = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is not a regular file"}.get(
            exc.errno, f"cannot be opened ({exc.strerror})"
        )
        raise ConfigError(f"results-file {path} {why}: refused") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"results-file {path} is not a regular file")
        first = os.pread(fd, 4096, 0).split(b"\n", 1)[0]
        if first.strip() and not _is_results_line(first):
            raise ConfigError(f"results-file {path} exists and is not a dropfleet results file: refused")
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _is_results_line(raw: bytes) -> bool:
    try:
        line = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(line, dict) and line.get("type") in ("header", "resume", "round", "end")


class RoundRecorder:
    """Reports each finished round once (`record`): the results file, the screen and the store."""

    def __init__(
        self,
        strategy: str,
        num_rounds: int,
        results_file: str | Path | None,
        console: Console | None = None,
        store: Store | None = None,
        run_id: str = "",
        attempt: str | None = None,
        resumed_after: int | None = None,
        header: dict[str, Any] | None = None,
    ) -> None:
        """`attempt` fences store writes to the owning Flower run; `resumed_after` is the
        last round published before a resume (its results file is appended to, not reset).

        The results file (`{run_id}` in its name is replaced) gets a `header` line
        (or a `resume` line), one `round` line per round and an `end` line.
        """
        self.strategy = strategy
        self.store, self.run_id, self.attempt = store, run_id, attempt
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.path = Path(str(results_file).replace("{run_id}", run_id)) if results_file else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._results = open_results_file(self.path) if self.path else None
        if self._results is not None:
            kind = "header" if resumed_after is None else "resume"
            self._write({"type": kind, **(header or {}), "resumed_after": resumed_after, "at": _now()})
        self.history: list[RoundStats] = []
        self._progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            auto_refresh=False,  # redrawn when a round ends: no refresh thread in the ServerApp
        )
        self._task = self._progress.add_task("rounds", total=num_rounds, completed=resumed_after or 0)
        self._progress.start()

    def record(
        self, stats: RoundStats, model: bytes | None = None, server_state: bytes | None = None
    ) -> RoundStats:
        """Report a finished round, once: the results file, the screen, and the store with its
        global model (and the strategy's server optimizer state)."""
        self.history.append(stats)
        if self.store is not None:
            self.store.publish_round(
                self.run_id,
                stats.round,
                stats.report(),
                model,
                stats.global_tracked,
                stats.fleet_events(),
                attempt=self.attempt,
                server_state=server_state,
            )
        self._write({"type": "round", "run_id": self.run_id, **stats.report()})
        self._print(stats)
        if stats.round:
            self._progress.advance(self._task)
            self._progress.refresh()
        return stats

    def end(self, status: str, error: str | None = None) -> None:
        """The results file's last line: how the run (or this attempt of it) ended."""
        self._write({"type": "end", "run_id": self.run_id, "status": status, "error": error, "at": _now()})

    def _write(self, line: dict[str, Any]) -> None:
        if self._results is not None:
            self._results.write(json.dumps(line, default=str) + "\n")
            self._results.flush()  # a reader (dropfleet simulate, a user's tail -f) sees each line

    def close(self) -> None:
        self._progress.stop()
        if self._results is not None:
            self._results.close()
            self._results = None

    def _print(self, s: RoundStats) -> None:
        self.console.print(round_line(s.report()))


def round_line(r: Mapping[str, Any]) -> str:
    """One round as the report prints it (rich markup): from `RoundStats.report()` or a results
    file's `round` line, so that `dropfleet simulate` prints the same table from the file."""
    if r["round"] == 0:
        accuracy, loss = 100 * r["accuracy"], r["loss"]
        return f"[bold]{r['strategy']}[/] initial model: accuracy {accuracy:.2f}%, loss {loss:.4f}"
    fed = f"{100 * r['fed_accuracy']:.2f}%" if r.get("fed_accuracy") is not None else "-"
    replayed = r.get("replayed") or 0
    return (
        f"round {r['round']:>3}  acc {100 * r['accuracy']:6.2f}%  loss {r['loss']:.4f}  fed-acc {fed:>7}  "
        f"replied {r['replied']}/{r['sampled']} failed {r['failed']} rejected {r['rejected']}  "
        f"up {r['bytes_up']:,} B  down {r['bytes_down']:,} B  tracked {r['global_tracked']:,}  "
        f"churn {100 * r['churn']:.1f}%{f'  replayed {replayed}' if replayed else ''}  {r['seconds']:.1f}s"
    )
