"""Talking to a SuperLink through Flower's own CLI (its Control API client).

`flwr run`, `flwr stop`, `flwr ls` and `flwr supernode list` already speak the
Control API with TLS and account auth; wrapping them keeps one way to do it.
"""

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dropfleet.common.errors import FlowerControlError
from dropfleet.fleet import app_signing

FLWR = str(Path(sys.executable).parent / "flwr")
STARTED_RUN = re.compile(r"Successfully started run (\d+)")


def _flwr(args: list[str], env: Mapping[str, str], timeout: float, cwd: str | None = None) -> str:
    try:
        done = subprocess.run(
            [FLWR, *args],
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FlowerControlError(f"flwr {args[0]} did not complete: {exc}") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-600:]
        raise FlowerControlError(f"flwr {args[0]} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _json(output: str) -> Any:
    start = min((i for i in (output.find("{"), output.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise FlowerControlError("flwr printed no JSON")
    try:
        data = json.loads(output[start:])
    except json.JSONDecodeError as exc:
        raise FlowerControlError(f"unparsable flwr output: {exc}") from None
    if isinstance(data, dict) and data.get("success") is False:  # flwr reports failures in JSON, exit 0
        raise FlowerControlError(f"flwr failed: {data.get('error-message', data)}")
    return data


def start_run(
    app_dir: str,
    connection: str,
    run_config: Mapping[str, object],
    env: Mapping[str, str],
    timeout: float = 120.0,
    signing_key: Path | None = None,
) -> str:
    """Submit a run (`flwr run APP CONNECTION`) and return Flower's run id.

    With `signing_key` (the operator's app key), the run carries the signature of
    its FAB and fused run config, without which no fleet process runs its code.
    """
    overrides = " ".join(
        f"{k}={toml_value(v)}" for k, v in run_config.items() if k != app_signing.SIGNATURE_KEY
    )
    if signing_key is not None:
        overrides = f"{overrides} {app_signing.SIGNATURE_KEY}={sign_run(app_dir, overrides, signing_key)}"
    args = ["run", app_dir, connection] + (["--run-config", overrides.strip()] if overrides.strip() else [])
    out = _flwr(args, env, timeout, cwd=app_dir)
    match = STARTED_RUN.search(out)
    if not match:
        raise FlowerControlError(f"flwr run printed no run id: {out.strip()[-300:]}")
    return match.group(1)


def sign_run(app_dir: str, overrides: str, signing_key: Path) -> str:
    """The `app-signature` for `flwr run APP_DIR --run-config OVERRIDES`, as a run-config value.

    The overrides are parsed by Flower's own parser, as `flwr run` will parse them and
    every task process will receive them.
    """
    from flwr.common.config import parse_config_args

    try:
        fab = app_signing.fab_for(Path(app_dir))
        parsed = parse_config_args([overrides]) if overrides else {}
    except ValueError as exc:
        raise FlowerControlError(f"cannot build the app to sign it: {exc}") from None
    return toml_value(app_signing.sign(app_signing.load_signing_key(signing_key), fab, parsed))


def stop_run(run_id: str, connection: str, env: Mapping[str, str], timeout: float = 60.0) -> None:
    _flwr(["stop", run_id, connection], env, timeout)


def run_status(run_id: str, connection: str, env: Mapping[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """One run as `flwr ls --run-id` reports it (status, network bytes, compute time)."""
    data = _json(_flwr(["ls", connection, "--run-id", run_id, "--format", "json"], env, timeout))
    for run in data.get("runs", []) if isinstance(data, dict) else []:
        if str(run.get("run-id")) == run_id:
            return run
    raise FlowerControlError(f"the SuperLink does not know run {run_id}")


def list_runs(connection: str, env: Mapping[str, str], timeout: float = 60.0) -> Any:
    """Every run the SuperLink knows (`flwr ls --format json`)."""
    return _json(_flwr(["ls", connection, "--format", "json"], env, timeout))


def is_live(run: Mapping[str, Any]) -> bool:
    """Whether a run from `run_status` may still have a ServerApp (pending, starting or running)."""
    return not str(run.get("status", "")).startswith("finished")


def list_supernodes(connection: str, env: Mapping[str, str], timeout: float = 60.0) -> Any:
    return _json(_flwr(["supernode", "list", connection, "--format", "json"], env, timeout))


def toml_value(value: object) -> str:
    """A run-config value as Flower's `--run-config` parser expects it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)
