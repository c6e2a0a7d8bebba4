"""docker-compose.yml mirrors the process fleet and validates; the edge kit's units verify."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dropfleet.deploy.compose import DEFAULT_SPEC, render
from dropfleet.deploy.topology import FleetSpec, local_layout, topology
from dropfleet.fleet.profiles import get_profile

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def test_committed_compose_file_is_generated():
    assert COMPOSE.read_text() == render(DEFAULT_SPEC), "docker-compose.yml is stale: run `make compose`"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "postgres"]])
def test_compose_file_validates(tmp_path, profile):
    for nodes in (4, 9):
        path = tmp_path / f"compose-{nodes}.yml"
        path.write_text(render(FleetSpec(nodes=nodes)))
        done = subprocess.run(
            ["docker-compose", "-f", str(path), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr


def _normalize(cmd: list[str], local: bool, state: Path) -> list[str]:
    out = []
    for arg in cmd:
        if local:
            for sub in ("certs", "trust", "keys"):
                arg = arg.replace(str(state / sub), f"/{sub}")
            arg = arg.replace(str(state), "/data")
            arg = arg.replace(str(Path(sys.executable).parent) + "/", "")
        else:
            arg = arg.replace("/secrets/", "/keys/")  # compose keeps a node's secret apart
        arg = re.sub(r"\b(127\.0\.0\.1|0\.0\.0\.0|superlink)\b", "HOST", arg)
        out.append(arg)
    return out


def test_host_network_compose_binds_loopback_only(tmp_path):
    spec = FleetSpec(nodes=3, superlink_port=18000, api_port=18080, node_port_base=19100)
    text = render(spec, "host")
    services = yaml.safe_load(text)["services"]
    assert "ports" not in text and "networks" not in yaml.safe_load(text)
    assert {svc["network_mode"] for svc in services.values()} == {"host"}  # profile-only ones too
    commands = [" ".join(svc.get("command", [])) for svc in services.values()]
    assert "0.0.0.0" not in " ".join(commands) and "superlink:" not in " ".join(commands)
    runtime = [services[f"supernode-{i}"]["command"] for i in range(3)]
    assert [c[c.index("--port") + 1] for c in runtime] == ["19100", "19101", "19102"]
    assert "127.0.0.1:19101" in services["superexec-clientapp-1"]["command"]
    if shutil.which("docker-compose"):
        path = tmp_path / "host.yml"
        path.write_text(text)
        for profile in ([], ["--profile", "postgres"]):
            done = subprocess.run(
                ["docker-compose", "-f", str(path), *profile, "config", "-q"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            assert done.returncode == 0, done.stderr


def test_compose_runs_what_the_process_fleet_runs(tmp_path):
    # Compose's server side binds every interface of its namespace: a process fleet published
    # beyond loopback is the same shape (the API behind the proxy).
    spec = FleetSpec(nodes=3, node_port_base=9094, state_dir=tmp_path, host="0.0.0.0")
    local = topology(spec, local_layout(spec, tmp_path))
    services = yaml.safe_load(render(spec))["services"]
    assert set(local) <= set(services)
    for name, cmd in local.items():
        want = _normalize(cmd, True, tmp_path)
        got = _normalize(services[name]["command"], False, tmp_path)
        if name.startswith(("supernode-", "superexec-clientapp-")):  # every node container has port 9094
            want = [w.replace("9095", "9094").replace("9096", "9094") for w in want]
        assert got == want, name


def test_every_service_is_healthy_ordered_and_constrained():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, svc in services.items():  # every long-running service
        assert "healthcheck" in svc or name in ("certs", "register"), name
    assert services["proxy"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert services["api"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert services["supernode-0"]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert "--isolation" in services["superlink"]["command"] and "process" in services["superlink"]["command"]
    assert any(a.startswith("--ssl-certfile") for a in services["superlink"]["command"])
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    # Only the proxy has a network namespace of its own on the server side, and it publishes:
    # the SuperLink's Control and Runtime APIs are on that namespace's loopback only.
    for name in ("superlink", "superexec-serverapp", "api", "register"):
        assert services[name]["network_mode"] == "service:proxy" and "ports" not in services[name], name
    link = services["superlink"]["command"]
    assert link[link.index("--host") + 1] == "127.0.0.1"
    assert services["proxy"]["ports"] == [
        "${DROPFLEET_PUBLISH_HOST:-127.0.0.1}:8000:8000",
        "${DROPFLEET_PUBLISH_HOST:-127.0.0.1}:8080:8080",
    ]
    assert services["api"]["environment"]["DROPFLEET_ENVIRONMENT"] == "${DROPFLEET_ENVIRONMENT:-production}"
    # The API binds the namespace's loopback; the proxy publishes it over TLS, and since the whole
    # compose network (the boards too) reaches it there, reads need a token.
    api_cmd, proxy_cmd = services["api"]["command"], services["proxy"]["command"]
    assert api_cmd[api_cmd.index("--host") + 1] == "127.0.0.1"
    assert api_cmd[api_cmd.index("--port") + 1] == "8081"
    assert proxy_cmd[proxy_cmd.index("--api-port") + 1] == "8080" and "--certs" in proxy_cmd
    assert proxy_cmd[proxy_cmd.index("--api-upstream-port") + 1] == "8081"
    assert services["api"]["environment"]["DROPFLEET_READ_ACCESS"] == "${DROPFLEET_READ_ACCESS:-token}"
    assert services["api"]["environment"]["DROPFLEET_READ_TOKEN_FILE"] == "/flwr/read-token"
    certs = services["certs"]
    assert certs["user"] == "root" and "--drop-to" in certs["command"]  # root only to chown mount points
    assert all(svc.get("user") is None for name, svc in services.items() if name != "certs")
    ledger = services["superexec-serverapp"]["command"]
    assert ledger[ledger.index("--signature-ledger") + 1] == "/data/store/signatures.db"  # a volume, rw
    assert services["api"]["environment"]["DROPFLEET_ADMIN_TOKEN"] == "${DROPFLEET_ADMIN_TOKEN:-}"
    assert services["api"]["environment"]["DROPFLEET_ADMIN_TOKEN_FILE"] == "/flwr/admin-token"
    assert "flwr-home:/flwr" in services["api"]["volumes"]  # writable: Flower writes credentials there
    # Keys only where they are needed: the server's TLS key in the SuperLink and the proxy, the
    # app signing key in the API; boards get the public trust volume and their node keys.
    for name, svc in services.items():
        mounted = {v.split(":")[0] for v in svc.get("volumes", [])}
        if name not in ("certs", "superlink", "proxy"):
            assert "certs" not in mounted, name
        if name not in ("certs", "api"):
            assert "signing" not in mounted, name
        i = name.rsplit("-", 1)[-1]
        if name.startswith("supernode-"):  # a board sees its own keys only
            assert mounted == {"trust", f"node-keys-{i}", f"node-secret-{i}"}, name
        if name.startswith("superexec-clientapp-"):  # ...and its ClientApps never see the node key
            assert mounted == {"trust", f"node-secret-{i}"}, name
        if name.startswith(("supernode-", "superexec-clientapp-")):
            assert "dropfleet-superexec" in svc["command"] or "flower-supernode" in svc["command"]
    for name, svc in services.items():
        if name.startswith("superexec-clientapp-"):
            i = int(name.rsplit("-", 1)[1])
            profile = get_profile(DEFAULT_SPEC.profiles[i % len(DEFAULT_SPEC.profiles)])
            assert svc["cpus"] == profile.cpus and svc["mem_limit"] >= profile.memory_bytes
            assert svc["network_mode"] == f"service:supernode-{i}"
            assert f'profile="{profile.name}"' in " ".join(services[f"supernode-{i}"]["command"])


def test_images_are_pinned_non_root_and_never_install_at_run_time():
    for name in ("Dockerfile.server", "Dockerfile.client"):
        text = (ROOT / "deploy" / name).read_text()
        assert "USER dropfleet" in text and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
        assert re.search(r"--require-hashes -r requirements(-client)?\.lock", text)
    # The client image's simulated boards partition Fashion-MNIST on the torch runtime: both locks.
    client = (ROOT / "deploy" / "Dockerfile.client").read_text()
    assert "-r requirements-client.lock -r requirements-torch.lock" in client


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    venv_bin = Path(sys.executable).parent
    for unit in ("dropfleet-supernode.service", "dropfleet-superexec.service"):
        text = (ROOT / "deploy" / "edge" / unit).read_text()
        # Verify against binaries that exist here; on a board they live in /opt/dropfleet/venv.
        (tmp_path / unit).write_text(text.replace("/opt/dropfleet/venv/bin", str(venv_bin)))
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "err"}
    done = subprocess.run(
        ["systemd-analyze", "verify", *[str(p) for p in sorted(tmp_path.glob("*.service"))]],
        capture_output=True,
        text=True,
        env=env,
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "dropfleet" in line and "node.env" not in line and "User=" not in line
    ]
    assert problems == [], problems


def test_edge_install_script_is_valid_bash():
    script = ROOT / "deploy" / "edge" / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(script, os.X_OK)
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--prefix" in helped.stdout


def test_every_environment_variable_in_compose_is_one_the_code_reads():
    from dropfleet.fleet.flower_env import OFFLINE_ENV
    from dropfleet.server.api.settings import Settings
    from dropfleet.server.store.store import DATABASE_URL_ENV

    known = (
        {f"DROPFLEET_{name.upper()}" for name in Settings.model_fields}
        | set(OFFLINE_ENV)
        | {DATABASE_URL_ENV}
    )
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, svc in services.items():
        if name == "postgres":
            continue
        assert set(svc.get("environment", {})) <= known, name
