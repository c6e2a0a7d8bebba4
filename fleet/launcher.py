"""Task launchers that run only the operator's signed apps: `dropfleet-superexec` and what it starts.

A SuperExec pulls tasks from its SuperLink or SuperNode and starts one
process per task: Flower's `flower-superexec` starts `flwr-serverapp`,
`flwr-clientapp`, or for other task types (agent apps, connectors, models)
other Flower commands, each of which unpacks the run's FAB and imports its
code. Flower 1.42 has no hook that checks a locally built FAB before that
import (its `--trusted-entities` only accepts Flower Hub apps), so dropfleet's
SuperExec (`dropfleet-superexec`, fleet/superexec.py: Flower's task loop with
its flags, in a fraction of its memory) takes only ClientApp and ServerApp
tasks and starts these launchers:

- `dropfleet-serverapp` / `dropfleet-clientapp`: Flower's own `flwr-serverapp` /
  `flwr-clientapp`, except that the FAB is installed only after
  `fleet/app_signing.verify` accepted the run's signature for this FAB and these
  run-config overrides (checked before the FAB is unzipped). A refused run
  fails with the reason (the ServerApp's run is marked failed; a ClientApp
  replies with an error), and none of its code is imported.
- every other task type: never acquired.

The trusted keys come from `--trusted-app-keys FILE` (OpenSSH Ed25519 public
keys), passed to the task processes as DROPFLEET_APP_TRUSTED_KEYS; a
development fleet gives `--allow-unsigned-apps` instead. Exactly one of the two
flags is required, and inherited values of those variables are cleared first.
The ServerApp's SuperExec also takes `--signature-ledger FILE`: a ServerApp
starts only on a fresh signature that no other run has used
(`app_signing.SignatureLedger`), so a signed run cannot be replayed.

Flower's processes are wrapped by replacing two module attributes each
(`install_from_fab` and the call that yields the run with its config
overrides); flwr is pinned
(`flwr==1.42.0`) and tests/deploy/test_published_fleet.py runs the real
processes, so a Flower release that moves them fails there, not in the field.
"""

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from dropfleet.fleet.app_signing import (
    ALLOW_UNSIGNED_ENV,
    LEDGER_ENV,
    TRUSTED_KEYS_ENV,
    AppSignatureError,
    SignatureLedger,
    load_trusted_keys,
    verify,
)

logger = logging.getLogger(__name__)


class _Gate:
    """Holds the run-config overrides of the task in hand and checks its FAB before Flower installs it."""

    def __init__(self, starts_run: bool = False) -> None:
        # The ServerApp starts the run: its signature must be fresh and not used by another run.
        self.starts_run = starts_run
        self.overrides: dict[str, Any] | None = None
        self.run_id: int | None = None

    def check(self, fab: bytes) -> None:
        if os.environ.get(ALLOW_UNSIGNED_ENV) == "1":
            logger.warning("%s=1: running an app without checking its signature", ALLOW_UNSIGNED_ENV)
            return
        keys_file = os.environ.get(TRUSTED_KEYS_ENV)
        if not keys_file:
            raise AppSignatureError(
                f"no trusted app keys ({TRUSTED_KEYS_ENV} is not set): every app is refused"
            )
        if self.overrides is None:
            raise AppSignatureError("the task's run was not seen before its FAB: refused")
        signature = verify(fab, self.overrides, load_trusted_keys(Path(keys_file)))  # before any unzip
        if self.starts_run:
            ledger = os.environ.get(LEDGER_ENV)
            if not ledger or self.run_id is None:
                raise AppSignatureError(
                    "the ServerApp's SuperExec has no --signature-ledger (signed runs could be "
                    "replayed): refused"
                )
            SignatureLedger(Path(ledger)).claim(signature, self.run_id)  # fresh, and not used yet


def _module(name: str) -> ModuleType:
    """The module itself: Flower's packages re-export functions under their modules' names."""
    module = importlib.import_module(name)
    if not isinstance(module, ModuleType):
        raise RuntimeError(f"{name} is not a module")
    return module


def _guard_install(module: ModuleType, gate: _Gate) -> None:
    original: Callable[..., Any] = module.install_from_fab

    def install_from_fab(fab: bytes, *args: Any, **kwargs: Any) -> Any:
        gate.check(fab)
        return original(fab, *args, **kwargs)

    module.install_from_fab = install_from_fab


def _flwr_clientapp() -> Callable[[], None]:
    """Flower's `flwr-clientapp` entry point, loaded from its own file: importing it by name runs
    `flwr.supernode.cli`'s `__init__`, which imports the whole SuperNode (SQLAlchemy, Alembic:
    120 MiB where the ClientApp needs 88) into every ClientApp process."""
    spec = importlib.util.find_spec("flwr.supernode.cli")  # imports flwr.supernode, not its cli package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("flwr.supernode.cli is not installed")
    path = Path(spec.submodule_search_locations[0]) / "flwr_clientapp.py"
    found = importlib.util.spec_from_file_location("flwr.supernode.cli.flwr_clientapp", path)
    if found is None or found.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module.flwr_clientapp


def clientapp() -> None:
    """`dropfleet-clientapp`: Flower's `flwr-clientapp`, for signed runs only."""
    # One BLAS thread unless the board says otherwise: a ClientApp shares a board's few cores with
    # its SuperNode, and OpenBLAS's default threads made a lean epoch 10-18x slower on two busy cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    flwr_clientapp = _flwr_clientapp()
    runtime = _module("flwr.supernode.runtime.run_clientapp")

    gate = _Gate()
    pull = runtime.pull_task_input

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        gate.overrides = dict(run.override_config)
        return message, context, run, fab

    runtime.pull_task_input = pull_task_input
    _guard_install(runtime, gate)
    flwr_clientapp()


def serverapp() -> None:
    """`dropfleet-serverapp`: Flower's `flwr-serverapp`, for signed runs only."""
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    runtime = _module("flwr.superlink.runtime.run_serverapp")

    gate = _Gate(starts_run=True)
    run_from_proto = runtime.run_from_proto

    def seen(proto: Any) -> Any:
        run = run_from_proto(proto)
        gate.overrides, gate.run_id = dict(run.override_config), int(run.run_id)
        return run

    runtime.run_from_proto = seen
    _guard_install(runtime, gate)
    flwr_serverapp()


# Flower options that would start task processes some other way than the command table above.
_REFUSED_FLAGS = ("--executor", "--executor-config", "--plugin-config")


def _take_gate_flags(argv: list[str]) -> list[str]:
    """Strip dropfleet's own flags (`--trusted-app-keys FILE`, `--allow-unsigned-apps`,
    `--signature-ledger FILE`) from `argv`, setting the environment every task process
    inherits; the rest is Flower's.

    Only these flags decide: an inherited DROPFLEET_ALLOW_UNSIGNED_APPS or trusted-keys
    variable is cleared first, and exactly one of the two flags must be given.
    """
    for name in (ALLOW_UNSIGNED_ENV, TRUSTED_KEYS_ENV, LEDGER_ENV):
        os.environ.pop(name, None)
    rest = []
    args = iter(argv)
    for arg in args:
        if arg.split("=")[0] in _REFUSED_FLAGS:
            raise AppSignatureError(f"{arg.split('=')[0]} is not allowed: tasks start only through the gate")
        if arg == "--trusted-app-keys" or arg.startswith("--trusted-app-keys="):
            value = arg.partition("=")[2] or next(args, "")
            if not value:
                raise SystemExit("--trusted-app-keys needs a file")
            load_trusted_keys(Path(value))  # refuse to start with an unreadable or empty key file
            os.environ[TRUSTED_KEYS_ENV] = str(Path(value).resolve())
        elif arg == "--signature-ledger" or arg.startswith("--signature-ledger="):
            value = arg.partition("=")[2] or next(args, "")
            if not value:
                raise SystemExit("--signature-ledger needs a file")
            SignatureLedger(Path(value))  # refuse to start where the ledger cannot be written
            os.environ[LEDGER_ENV] = str(Path(value).resolve())
        elif arg == "--allow-unsigned-apps":
            os.environ[ALLOW_UNSIGNED_ENV] = "1"
        else:
            rest.append(arg)
    if (TRUSTED_KEYS_ENV in os.environ) == (ALLOW_UNSIGNED_ENV in os.environ):
        raise AppSignatureError("give exactly one of --trusted-app-keys FILE and --allow-unsigned-apps")
    return rest


def superexec() -> None:
    """`dropfleet-superexec`: takes ClientApp and ServerApp tasks and starts the launchers above
    (fleet/superexec.py: Flower's task loop without Flower's imports).

    Takes the runtime API flags plus `--trusted-app-keys FILE` (the operator's public app keys)
    or, for a development fleet, `--allow-unsigned-apps`; on the server, `--signature-ledger FILE`.
    """
    from dropfleet.fleet.superexec import run

    try:
        rest = _take_gate_flags(sys.argv[1:])
    except AppSignatureError as exc:
        raise SystemExit(f"dropfleet-superexec: {exc}") from None
    run(rest)
