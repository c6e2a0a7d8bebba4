"""`docker compose up` for real: images built, a two-node containerized fleet trains over REST.

A private Docker engine (host networking only, its own data root, stopped by
its PID) builds a base image from Debian packages, then both images exactly
as users build them (plus the base-image and wheel-source build args), and
runs `docker-compose up` on the file `dropfleet compose --network host`
generates — the steps docs/operations.md gives. Marked `e2e`: `make
test-e2e` (which CI runs) and skipped when the tools are missing.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from dropfleet.common.wire.codec import decode
from dropfleet.deploy.compose import MIN_CONTAINER_BYTES
from dropfleet.fleet.flower_env import flower_env, write_connection
from tests.deploy.docker_engine import BASE_IMAGE, build_base_image, engine, missing_tools, wheel_server
from tests.deploy.rest import TWO_NODE_RUN, run_to_end
from tests.deploy.test_fleet_e2e import free_range
from tests.deploy.test_node_auth import start_intruder
from tests.deploy.test_published_fleet import outsider_app
from tests.integration.procs import free_port, stop

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DROPFLEET = str(Path(sys.executable).parent / "dropfleet")
PROJECT = "dropfleet-e2e"


def torch_wheel_dir() -> Path | None:
    """The local directory this machine's pip takes the CPU torch wheel from, if any."""
    candidates = [os.environ.get("PIP_FIND_LINKS", "")]
    got = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    )
    candidates.append(got.stdout.strip())
    for entry in " ".join(candidates).split():
        path = Path(entry.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-2.13.0*cpu*.whl")):
            return path
    return None


def test_compose_fleet_builds_starts_trains_and_leaves_nothing(tmp_path):
    if missing := missing_tools():
        pytest.skip(f"missing {missing}: apt-get install docker.io docker-compose mmdebstrap")
    timings: dict[str, float] = {}
    # A short root: containerd's socket paths under it must fit a unix socket name (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        try:
            eng = stack.enter_context(engine(root))
        except RuntimeError as exc:
            if os.environ.get("DROPFLEET_REQUIRE_ENGINE") == "1":  # CI: the engine must run
                raise
            pytest.skip(f"no Docker engine can start here: {exc}")
        timings["base image"] = build_base_image(eng, tmp_path / "base")
        wheels = torch_wheel_dir()
        for image in ("server", "client"):
            t0 = time.monotonic()
            with wheel_server(wheels or tmp_path) as url:
                source = f"--find-links {url}" if wheels else ""
                args = ["--build-arg", f"TORCH_SOURCE={source}"] if source else []
                eng.run(
                    "docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                    *args, "-f", f"deploy/Dockerfile.{image}", "-t", f"dropfleet-{image}:0.1.0", str(ROOT),
                    timeout=1500,
                )  # fmt: skip
            timings[f"{image} image"] = time.monotonic() - t0

        link, api_port = free_port(), free_port()
        generated = subprocess.run(
            [
                DROPFLEET, "compose", "--network", "host", "--nodes", "2",
                "--profiles", "mcu-512k,pi-zero-512m",
                "--superlink-port", str(link), "--api-port", str(api_port),
                "--node-port-base", str(free_range(2)),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        compose_file = tmp_path / "docker-compose.yml"
        compose_file.write_text(generated.stdout)
        assert "networks" not in generated.stdout and "ports" not in generated.stdout

        def compose(*args, timeout=600, check=True):
            return eng.run(
                "docker-compose", "-f", str(compose_file), "--project-directory", str(ROOT), "-p", PROJECT,
                *args, timeout=timeout, check=check,
            )  # fmt: skip

        t0 = time.monotonic()
        try:
            compose("up", "-d", "--no-build")
            api = f"http://127.0.0.1:{api_port}"
            _wait(lambda: httpx.get(f"{api}/v1/ready", timeout=3).is_success, 300, compose)
            timings["fleet healthy"] = time.monotonic() - t0
            token = compose("exec", "-T", "api", "cat", "/flwr/admin-token").stdout.strip()
            assert len(token) >= 32  # a random token made on first start, not a placeholder
            # An outsider holding what every board gets (ca.crt) is refused on the Control API.
            outsider = tmp_path / "outsider"
            outsider.mkdir()
            (outsider / "ca.crt").write_text(compose("exec", "-T", "api", "cat", "/trust/ca.crt").stdout)
            write_connection(outsider, "fleet", f"127.0.0.1:{link}", outsider / "ca.crt")
            listed = subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), "ls", "fleet", "--format", "json"],
                env=flower_env(outsider), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert '"success": false' in listed.stdout and "403" in listed.stdout, listed.stdout
            app = outsider_app(tmp_path, tmp_path / "outsider-out")
            submitted = subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), "run", str(app), "fleet"],
                env=flower_env(outsider), capture_output=True, text=True, timeout=120, cwd=app,
            )  # fmt: skip
            said = submitted.stdout + submitted.stderr
            assert "Successfully started run" not in said and "403" in said, said
            # A SuperNode whose key nobody registered never joins.
            intruder = start_intruder(tmp_path, f"127.0.0.1:{link}", outsider / "ca.crt")
            try:
                time.sleep(15)
            finally:
                stop([intruder])
            log = (tmp_path / "intruder.log").read_text()
            assert "SuperNode ID" not in log and "failed" in log.lower(), log[-2000:]
            # A board's ClientApps run in a container that holds its SuperExec secret, not its key.
            seen = compose("exec", "-T", "superexec-clientapp-0", "sh", "-c", "ls /secrets; ls /keys || true")
            assert seen.stdout.split() == ["superexec-node-0"], seen.stdout
            signer = compose("exec", "-T", "api", "cat", "/trust/app-signer.pub").stdout
            assert signer.startswith("ssh-ed25519 ")  # what boards trust: only signed apps run
            assert httpx.post(f"{api}/v1/runs", json={"run_config": {}}, timeout=30).status_code == 401
            t0 = time.monotonic()
            run_id, events = run_to_end(api, token, {**TWO_NODE_RUN, "num-server-rounds": 2})
            timings["two rounds"] = time.monotonic() - t0
            rounds = [e for e in events if "round" in e]
            assert events[-1] == {"status": "finished"}, (events, compose("logs", "--tail", "60").stdout)
            assert [r["round"] for r in rounds] == [0, 1, 2]
            assert all(r["replied"] == 2 for r in rounds[1:]), rounds
            model = httpx.get(f"{api}/v1/runs/{run_id}/model", params={"format": "protobuf"}, timeout=30)
            assert decode(model.content).num_tracked == rounds[-1]["tracked"] > 0  # the published set
            # The smallest boards' ClientApps trained inside their containers' memory limits.
            for i in (0, 1):
                name = compose("ps", "-q", f"superexec-clientapp-{i}").stdout.strip()
                state = json.loads(eng.run("docker", "inspect", name).stdout)[0]
                assert (
                    state["HostConfig"]["Memory"] == MIN_CONTAINER_BYTES and not state["State"]["OOMKilled"]
                )
        finally:
            compose("down", "-v", "--remove-orphans", check=False)
        assert eng.run("docker", "ps", "-aq").stdout.strip() == ""
        volumes = eng.run("docker", "volume", "ls", "-q").stdout.split()
        assert not [v for v in volumes if v.startswith(PROJECT)], volumes
    print("\n" + "\n".join(f"{k}: {v:.0f} s" for k, v in timings.items()))


def _wait(ok, timeout, compose):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    logs = compose("logs", "--tail", "40", check=False).stdout
    raise AssertionError("the fleet never turned healthy:\n" + re.sub(r"\x1b\[[0-9;]*m", "", logs)[-6000:])
