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
    "--window-size=1280,1400",
    "--virtual-time-budget=8000",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_status_page_shows_runs_fleet_and_charts(tmp_path):
    live = start_api(tmp_path)
    try:
        fill(live.store, run_id="100", rounds=3, strategy="fedavg")  # the dense baseline
        fill(live.store, run_id="101", rounds=3)
        fill(live.store, run_id="102", rounds=1, status="failed")
        live.store.finish_run("102", "failed", "RunFailedError: 3 rounds in a row had fewer than 2 replies")
        fill(live.store, run_id="103", rounds=2, status="running", num_rounds=10)
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
    assert "RunFailedError: 3 rounds in a row" in dom  # a failed run's reason
    assert re.search(r'class="eta">16 s<', dom)  # running run 103: 8 rounds left at 2 s each
    assert "pi4-4g" in dom and "budget too small" in dom  # the fleet, with each node's last error
    assert "3.65 MB / 4.32 MB" in dom and "131.1 kB" in dom  # measured step peak vs budget; kept state
    assert "<td>dense</td>" in dom and dom.count("</span> unknown</td>") == 2  # trainer; online unknown
    race = dom[dom.index('id="race"') : dom.index('id="acc"')]
    assert "log scale" in race and "dense FedAvg run 100" in race and race.count('class="series"') == 2
    assert ">10.0 kB<" in race and ">1.00 MB<" in race  # log-x ticks at powers of ten
    assert len(re.findall(r'<polyline class="series"[^>]*points="\d', dom)) == 4  # every chart drawn
    assert re.search(r'id="updated">Updated ', dom)  # the refresh completed without an error
    # The screenshot itself shows the charts: pixels of both series' colours.
    from PIL import Image

    pixels = Image.open(shot).convert("RGB").getdata()
    run_blue = sum(1 for p in pixels if abs(p[0] - 43) + abs(p[1] - 108) + abs(p[2] - 176) < 30)
    dense_orange = sum(1 for p in pixels if abs(p[0] - 192) + abs(p[1] - 86) + abs(p[2] - 33) < 30)
    assert run_blue > 500 and dense_orange > 100, (run_blue, dense_orange)
    shutil.copy(shot, "/tmp/dropfleet-status.png")  # for a person to look at
