"""The environment of every Flower process dropfleet starts, in one place.

Simulation (`dropfleet simulate`), the process fleet, the API's `flwr` calls
and the compose file all take their offline switches, Flower home and
connection config (`$FLWR_HOME/config.toml`) from here.
"""

import os
import sys
from collections.abc import Mapping
from pathlib import Path

# Offline, each one matters: runtime dependency installation would `uv sync` a multi-GB
# CUDA torch; telemetry and update checks and Hugging Face lookups would reach out.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
}
# The Flower app (`flwr run PROJECT_ROOT`): this repository, with its pyproject.toml.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCAL = "local"


def flower_env(
    flwr_home: Path, base: Mapping[str, str] | None = None, superlink_port: int | None = None
) -> dict[str, str]:
    """`base` (default: this process's environment) offline, with FLWR_HOME and this venv first on PATH.

    `superlink_port` moves the managed local SuperLink of a simulation off its default ports.
    """
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if superlink_port:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(superlink_port)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(superlink_port + 2)
    return env


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None, insecure: bool = False
) -> Path:
    """$FLWR_HOME/config.toml whose default connection `name` is `address` (":local:" for simulation)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
    if root_certificates:
        text += f'root-certificates = "{root_certificates}"\n'
    elif insecure:
        text += "insecure = true\n"
    path = flwr_home / "config.toml"
    path.write_text(text)
    return path


def write_local_connection(flwr_home: Path) -> Path:
    """A config.toml whose default connection is the managed local simulation."""
    return write_connection(flwr_home, LOCAL, ":local:")
