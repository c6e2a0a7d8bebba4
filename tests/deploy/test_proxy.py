"""The published port's nginx config: only the Fleet API and /health pass, and nginx accepts it."""

import re
import shutil
import subprocess

import pytest

from dropfleet.deploy.certs import create_certificates
from dropfleet.deploy.proxy import PASSED, ProxySpec, nginx_binary, render, write_config

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
