"""Starting a run over REST and following it to its end, as the deployment tests do."""

import json

import httpx


def run_to_end(api: str, token: str, run_config: dict, timeout: float = 900) -> tuple[str, list[dict]]:
    """POST /v1/runs, then the run's server-sent events until `end`: (run id, event data)."""
    started = httpx.post(
        f"{api}/v1/runs",
        headers={"Authorization": f"Bearer {token}"},
        timeout=180,
        json={"run_config": run_config},
    )
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    events = []
    with httpx.stream("GET", f"{api}/v1/runs/{run_id}/events", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return run_id, events


# Two devices, a short run: every round must hear from both.
TWO_NODE_RUN = {"train-subset": 300, "min-available-nodes": 2, "min-train-nodes": 2, "fraction-evaluate": 0.0}
