"""The published fleet as an outsider meets it: only the operator runs code on the server and the boards.

`dropfleet fleet up` with its defaults, real processes on 127.0.0.1. The
outsider holds what every board receives (ca.crt) and reaches the published
port. Then the layers behind the proxy are tried one by one, as if the one in
front of them had failed: a run submitted on the operator's own Control API
without the operator's signature, a signed run replayed or submitted past its
expiry, and a server whose SuperExec was made to run
anything (a compromised server), whose ClientApp tasks the boards must refuse.
"""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from flwr.common.config import parse_config_args

from dropfleet.deploy.material import SIGNING_KEY
from dropfleet.deploy.topology import SIGNATURE_LEDGER
from dropfleet.fleet import app_signing
from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env, write_connection
from dropfleet.server.flower_control import sign_run, toml_value
from tests.deploy.test_fleet_e2e import fleet_up, run
from tests.integration.procs import processes_mentioning, start, stop

BIN = Path(sys.executable).parent
NODES = 2

SERVER_APP = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config["out-dir"])
    (out / "server-ran").write_text("an outsider's code ran on the server")
    nodes = []
    for _ in range(60):
        nodes = list(grid.get_node_ids())
        if len(nodes) >= {nodes}:
            break
        time.sleep(1)
    messages = [
        Message(RecordDict({{"c": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=120)
    reasons = [r.error.reason if r.has_error() else "answered" for r in replies]
    (out / "replies.json").write_text(json.dumps(reasons))
"""

CLIENT_APP = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    Path(context.run_config["out-dir"], "client-ran").write_text("an outsider's code ran on a board")
    return Message(RecordDict(), reply_to=msg)
"""


def outsider_app(root: Path, out: Path) -> Path:
    app = root / "outsiderapp"
    (app / "outsiderapp").mkdir(parents=True)
    (app / "outsiderapp" / "__init__.py").write_text("")
    (app / "outsiderapp" / "server_app.py").write_text(SERVER_APP.format(nodes=NODES))
    (app / "outsiderapp" / "client_app.py").write_text(CLIENT_APP)
    (app / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "outsiderapp"
        version = "1.0.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "outsider"

        [tool.flwr.app.components]
        serverapp = "outsiderapp.server_app:app"
        clientapp = "outsiderapp.client_app:app"

        [tool.flwr.app.config]
        out-dir = "{out}"
        """)
    )
    return app


def flwr(home: Path, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    return done.stdout + done.stderr


def started_run(output: str) -> str:
    assert "Successfully started run" in output, output[-1500:]
    return output.split("Successfully started run")[1].split()[0]


def wait_finished(home: Path, run_id: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = flwr(home, "ls", "fleet", "--run-id", run_id, "--format", "json")
        status = json.loads(out[out.index("{") :])["runs"][0]["status"]
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish")


def wait_claimed(ledger: Path, run_id: str, timeout: float = 120) -> None:
    """Until the ServerApp's launcher has claimed the run's signature in the ledger."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
            if db.execute("SELECT 1 FROM claims WHERE run_id = ?", (run_id,)).fetchone():
                return
        time.sleep(1)
    raise AssertionError(f"run {run_id}'s signature was never claimed")


@pytest.mark.slow  # a whole published fleet, three refused runs and a signed one (~2 min): make test-slow
def test_an_outsider_cannot_run_code_on_the_server_or_the_boards(tmp_path):
    state = tmp_path / "fleet"
    out = tmp_path / "outsider-out"
    out.mkdir()
    up = fleet_up(state, NODES)
    rogue = None
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        info = json.loads(up.stdout)
        assert info["node_auth"] and info["tls"] and info["signed_apps_only"]
        operator = state / "flwr"  # FLWR_HOME of the operator: the Control API on loopback

        # The outsider: the fleet's published address and the CA certificate every board has.
        home = tmp_path / "outsider"
        (home / "ca.crt").parent.mkdir(parents=True)
        (home / "ca.crt").write_bytes((state / "certs" / "ca.crt").read_bytes())
        write_connection(home, "fleet", info["superlink"], home / "ca.crt")
        app = outsider_app(tmp_path, out)
        listed = flwr(home, "ls", "fleet", "--format", "json")
        assert '"success": false' in listed and "403" in listed, listed
        submitted = flwr(home, "run", str(app), "fleet", cwd=app)
        assert "Successfully started run" not in submitted and "403" in submitted, submitted
        registered = flwr(home, "supernode", "register", str(state / "keys" / "node-0.pub"), "fleet")
        assert "registered successfully" not in registered and "403" in registered, registered
        # Every route but the Fleet API: refused at the proxy, whatever the method.
        link = f"https://{info['superlink']}"
        ca = str(home / "ca.crt")
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/pull-task-input", "/"):
            assert httpx.post(link + path, verify=ca, content=b"\0").status_code == 403, path
        assert httpx.get(f"{link}/health", verify=ca).status_code == 200
        assert '"runs": []' in flwr(operator, "ls", "fleet", "--format", "json")  # nothing started

        # Behind the proxy: a run on the operator's Control API that the operator did not sign.
        # The ServerApp is refused before any of the app's code is imported.
        unsigned = started_run(flwr(operator, "run", str(app), "fleet", cwd=app))
        assert wait_finished(operator, unsigned) == "finished:failed"
        assert "not signed by the operator" in flwr(operator, "log", unsigned, "fleet", "--show")
        assert not (out / "server-ran").exists()

        # A signature is good for one run: the operator's signed run, submitted again as is (a
        # replay on the loopback Control API), is refused; so is one signed too long ago.
        overrides = "num-server-rounds=1 train-subset=100 min-available-nodes=2 fraction-evaluate=0.0"
        signature = sign_run(str(PROJECT_ROOT), overrides, state / "keys" / SIGNING_KEY)
        signed = f"{overrides} app-signature={signature}"
        first = started_run(flwr(operator, "run", str(PROJECT_ROOT), "fleet", "--run-config", signed))
        wait_claimed(state / "store" / SIGNATURE_LEDGER, first)
        flwr(operator, "stop", first, "fleet")
        replay = started_run(flwr(operator, "run", str(PROJECT_ROOT), "fleet", "--run-config", signed))
        assert wait_finished(operator, replay) == "finished:failed"
        assert f"used by run {first} already (a replay)" in flwr(operator, "log", replay, "fleet", "--show")
        key = app_signing.load_signing_key(state / "keys" / SIGNING_KEY)
        parsed = parse_config_args([overrides])
        old = app_signing.sign(key, app_signing.fab_for(PROJECT_ROOT), parsed, now=time.time() - 7200)
        stale = f"{overrides} app-signature={toml_value(old)}"
        expired = started_run(flwr(operator, "run", str(PROJECT_ROOT), "fleet", "--run-config", stale))
        assert wait_finished(operator, expired) == "finished:failed"
        assert "app-signature expired" in flwr(operator, "log", expired, "fleet", "--show")

        # A compromised server: its SuperExec replaced by one that runs anything. The outsider's
        # ServerApp now runs, and sends work to every board; each board refuses it, with the reason.
        pid = json.loads((state / "pids" / "superexec-serverapp.json").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)
        rogue = start(
            [
                str(BIN / "dropfleet-superexec"),
                "--runtime-api-address",
                info["control_api"],
                "--root-certificates",
                str(state / "certs" / "ca.crt"),
                "--superexec-auth-secret-file",
                str(state / "keys" / "superexec-server"),
                "--allow-unsigned-apps",
            ],
            tmp_path / "rogue-superexec.log",
            flower_env(tmp_path / "rogue-home"),
        )
        hostile = started_run(flwr(operator, "run", str(app), "fleet", cwd=app))
        wait_finished(operator, hostile)
        assert (out / "server-ran").exists()  # the rogue server did run it...
        reasons = json.loads((out / "replies.json").read_text())
        assert len(reasons) == NODES, reasons
        assert all("AppSignatureError" in r and "not signed by the operator" in r for r in reasons), reasons
        assert not (out / "client-ran").exists()  # ...and no board did
    finally:
        if rogue is not None:
            stop([rogue])
        run("fleet", "down", "--state-dir", str(state))
    time.sleep(1)
    assert processes_mentioning(str(state)) == []
