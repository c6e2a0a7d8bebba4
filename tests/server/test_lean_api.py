"""The REST API and the run preflight stay lean: they plan devices' training without torch or numba.

The preflight (`server/preflight.check_run`) plans every profile of the fleet mix
from closed-form footprints (`common/device/budget.py`); it once built trainers,
which imported numba and took a live API from 288 to 468 MiB on its first
`POST /v1/runs`.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from tests.integration.procs import stop
from tests.server.live_api import ADMIN, start_api

MIB = 1024 * 1024
# Paths of the libraries a lean server process must never load.
HEAVY_LIBRARIES = ("/torch/", "/numba/", "/llvmlite/")
# Refused by the preflight's plan, not by parsing: no profile holds a CNN step at batch 512.
UNTRAINABLE = {"model-id": "cnn-bn-prelu", "batch-size": 512}


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def heavy_mappings(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {lib.strip("/") for lib in HEAVY_LIBRARIES if lib in maps}


def test_planning_every_profile_imports_neither_torch_nor_numba():
    # torch None in sys.modules makes any `import torch` raise; numba is installed here, so it is
    # checked by its absence from sys.modules after the preflight planned every profile and backend.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        from dropfleet.common.device.budget import BACKENDS
        from dropfleet.common.errors import BudgetError
        from dropfleet.common.model.registry import MODELS
        from dropfleet.fleet.profiles import load_profiles, plan_training
        from dropfleet.server.preflight import check_run
        import dropfleet.fleet.records, dropfleet.fleet.replies, dropfleet.server.api.app
        check_run({}, data=False)
        for profile in load_profiles().values():
            for model_id in MODELS:
                for backend in BACKENDS:
                    try:
                        plan_training(profile.state_budget_bytes, model_id, 8, 100, backend=backend)
                    except BudgetError:
                        pass
        heavy = sorted(m for m in ("numba", "llvmlite", "datasets") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_run_submitted_to_the_live_api_costs_it_no_heavy_imports(tmp_path):
    live = start_api(tmp_path)
    pid, auth, runs = live.proc.pid, {"Authorization": f"Bearer {ADMIN}"}, live.url + "/v1/runs"
    try:
        before = peak_rss(pid)
        refused = httpx.post(runs, json={"run_config": UNTRAINABLE}, headers=auth, timeout=60)
        assert refused.status_code == 400 and "no device in fleet-mix can train" in refused.text
        # The default config passes the preflight; only then is the (absent) SuperLink asked.
        accepted = httpx.post(runs, json={"run_config": {}}, headers=auth, timeout=120)
        assert accepted.status_code == 502 and "flwr run failed" in accepted.text
        grown = peak_rss(pid) - before
        assert grown < 50 * MIB, f"the API's peak RSS grew by {grown / MIB:.1f} MiB over POST /v1/runs"
        assert not heavy_mappings(pid), f"the API process mapped {sorted(heavy_mappings(pid))}"
    finally:
        stop([live.proc])
