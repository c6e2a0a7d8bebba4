"""How every command prints: one console, tables that never cut ids, errors on stderr, exit codes."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

from dropfleet.cli.api_client import API_URL_ENV, DEFAULT_API_URL, ApiClient, ApiError

T = TypeVar("T")
ApiUrl = Annotated[
    str | None, typer.Option("--api", help=f"API URL (default: ${API_URL_ENV}, else {DEFAULT_API_URL})")
]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
StateDir = Annotated[Path, typer.Option(help="where PID files, logs, certificates and the store live")]
# Piped (no terminal to fit), tables take the width they need: ids and errors are never cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def exit_with(code: int, reason: str) -> NoReturn:
    """Fail: the reason as the last line on stderr, and a non-zero exit code."""
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(code)


def from_api(
    api: str | None, fetch: Callable[[ApiClient], T], as_json: bool, render: Callable[[T], None]
) -> None:
    """Ask the API, then print JSON (`--json`) or the human rendering; an API error exits 1."""
    try:
        data = fetch(ApiClient(api))
    except ApiError as exc:
        exit_with(1, str(exc))
    if as_json:
        typer.echo(json.dumps(data, default=str))
    else:
        render(data)


def table(*headers: str) -> Table:
    """A table that folds long cells onto more lines instead of cutting them (ids stay whole)."""
    return Table(*(Column(h, overflow="fold") for h in headers))


def pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def profile_list(text: str) -> tuple[str, ...]:
    """A comma-separated profile list, as `--profiles` takes it."""
    return tuple(p.strip() for p in text.split(",") if p.strip())
