"""The published port's nginx: only the Fleet API and /health pass; a published REST API goes over TLS."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dropfleet.deploy.certs import create_certificates
from dropfleet.deploy.proxy import PASSED, ProxySpec, nginx_binary, render, write_config
from tests.integration.procs import free_port, start, stop, wait_healthy
from tests.server.live_api import READER, start_api

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (nginx-light)")


@pytest.mark.parametrize("tls", [True, False])
def test_nginx_accepts_the_config_and_it_passes_the_fleet_api_only(tmp_path, tls):
    certs = create_certificates(tmp_path / "certs") if tls else None
    spec = ProxySpec(
        "127.0.0.1", 18000, 18001, str(tmp_path / "certs") if tls else None, str(tmp_path / "run")
    )
    conf = write_config(spec, tmp_path / "nginx.conf")
    checked = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-c", str(conf), "-p", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    text = render(spec)
    passes = re.findall(r"location (?:= )?(\S+) \{\s+proxy_pass", text)
    assert passes == list(PASSED) == ["/v1/fleet/", "/health"]
    assert re.search(r"location / \{[^}]*return 403", text)  # the Control and Runtime APIs, and the rest
    if certs:
        assert "listen 127.0.0.1:18000 ssl" in text and "proxy_ssl_verify on" in text
        assert "proxy_pass https://127.0.0.1:18001" in text
    else:
        assert "proxy_pass http://127.0.0.1:18001" in text and "ssl" not in text


def test_the_proxy_publishes_the_api_over_tls_and_reads_still_need_the_token(tmp_path):
    """A published fleet's REST API: nginx terminates TLS and forwards to the API on loopback,
    events unbuffered; the API's own token checks stay where they are."""
    create_certificates(tmp_path / "certs")
    ca = str(tmp_path / "certs" / "ca.crt")
    live = start_api(tmp_path, DROPFLEET_READ_ACCESS="token", DROPFLEET_READ_TOKEN=READER)
    live.store.register_run("77", "dropback", "mlp-90k", 0, 1, {})
    published = free_port()
    proxy = start(
        [
            str(Path(sys.executable).parent / "dropfleet-proxy"),
            "--listen", f"127.0.0.1:{free_port()}",
            "--upstream-port", str(free_port()),
            "--run-dir", str(tmp_path / "run"),
            "--certs", str(tmp_path / "certs"),
            "--api-port", str(published),
            "--api-upstream-port", live.url.rsplit(":", 1)[1],
        ],
        tmp_path / "proxy.log",
        dict(os.environ),
    )  # fmt: skip
    api = f"https://127.0.0.1:{published}"
    reader = {"Authorization": f"Bearer {READER}"}
    try:
        wait_healthy(api + "/v1/health", verify=ca)
        assert httpx.get(f"http://127.0.0.1:{published}/v1/health").status_code == 400  # TLS only
        assert httpx.get(api + "/v1/runs", verify=ca).status_code == 401
        assert [r["run_id"] for r in httpx.get(api + "/v1/runs", verify=ca, headers=reader).json()] == ["77"]

        def serverapp() -> None:  # the round arrives while the follower is connected
            time.sleep(1)
            live.store.start_run("77", "dropback", "mlp-90k", 0, 1, {"num-server-rounds": 1})
            live.store.publish_round("77", 0, {"accuracy": 0.1}, None, 0)
            live.store.finish_run("77", "finished")

        threading.Thread(target=serverapp).start()
        kinds = []
        with httpx.stream("GET", api + "/v1/runs/77/events", verify=ca, headers=reader, timeout=30) as r:
            kinds = [line for line in r.iter_lines() if line.startswith("event:")]
        assert kinds == ["event: round", "event: end"]
        # The command line, as a reader elsewhere runs it: the fleet's CA and the read token.
        env = {**os.environ, "DROPFLEET_API_CA": ca, "DROPFLEET_TOKEN": READER}
        cli = subprocess.run(
            [str(Path(sys.executable).parent / "dropfleet"), "runs", "--json", "--api", api],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0 and '"77"' in cli.stdout, cli.stderr
    finally:
        stop([proxy, live.proc])
