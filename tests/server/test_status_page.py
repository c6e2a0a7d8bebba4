"""The status page rendered by a real headless Chromium (Debian's), with a screenshot."""

import re
import shutil
import subprocess

import pytest

from tests.integration.procs import stop
from tests.server.live_api import fill, start_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    "--virtual-time-budget=8000",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_status_page_shows_runs_fleet_and_charts(tmp_path):
    live = start_api(tmp_path)
    try:
        fill(live.store, run_id="101", rounds=3)
        profile = ["--user-data-dir=" + str(tmp_path / "chrome")]
        dom = subprocess.run(
            [CHROMIUM, *FLAGS, *profile, "--dump-dom", live.url + "/"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        shot = tmp_path / "status.png"
        subprocess.run(
            [CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", live.url + "/"],
            capture_output=True,
            timeout=120,
        )
    finally:
        stop([live.proc])
    assert 'data-run="101"' in dom and "finished" in dom  # the runs table, filled by the page's script
    assert "pi4-4g" in dom and "budget too small" not in dom  # the fleet table
    assert len(re.findall(r'<polyline[^>]*points="\d', dom)) == 2 and "80%" in dom  # both charts drawn
    assert re.search(r'id="updated">Updated ', dom)  # the refresh completed without an error
    assert shot.exists() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/dropfleet-status.png")  # for a person to look at
