"""The REST API against a real uvicorn on 127.0.0.1."""

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from dropfleet.common.wire.codec import decode
from dropfleet.server.api.settings import Settings
from tests.integration.procs import free_port, processes_mentioning, stop
from tests.server.live_api import ADMIN, READER, fill, start_api


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = start_api(tmp_path_factory.mktemp("api"))
    live.models = fill(live.store)
    live.store.start_run("202", "fedavg", "mlp-90k", 0, 1, {})
    yield live
    stop([live.proc])


def test_health_and_readiness(api):
    assert httpx.get(api.url + "/v1/health").json() == {"status": "ok"}
    assert httpx.get(api.url + "/v1/ready").json() == {"status": "ready"}


def test_runs_and_rounds(api):
    runs = httpx.get(api.url + "/v1/runs").json()
    assert {r["run_id"] for r in runs} >= {"101", "202"}
    run = httpx.get(api.url + "/v1/runs/101").json()
    assert run["status"] == "finished" and run["strategy"] == "dropback"
    rounds = httpx.get(api.url + "/v1/runs/101/rounds").json()
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["accuracy"] == pytest.approx(0.7)
    assert [r["replayed"] for r in rounds] == [0, 0, 1]
    assert [r["round"] for r in httpx.get(api.url + "/v1/runs/101/rounds", params={"after": 1}).json()] == [2]


@pytest.mark.parametrize(
    ("path", "code", "needle"),
    [
        ("/v1/runs/999", 404, "run 999 not found"),
        ("/v1/runs/abc", 422, "pattern"),
        ("/v1/runs/101/rounds?after=-5", 422, "greater than or equal"),
        ("/v1/runs/101/model?round=9", 404, "no model for round 9"),
        ("/v1/runs/202/model", 404, "published no model"),
        ("/v1/runs/101/model?format=xml", 422, "pattern"),
    ],
)
def test_bad_requests_get_clear_4xx(api, path, code, needle):
    r = httpx.get(api.url + path)
    assert r.status_code == code and needle in r.text


def test_model_bytes_decode_with_the_proto(api):
    r = httpx.get(api.url + "/v1/runs/101/model", headers={"Accept": "application/x-protobuf"})
    assert r.headers["content-type"] == "application/x-protobuf"
    assert r.content == api.models[-1]
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    model = decode(r.content)
    assert model.num_tracked == 4000 and model.seed == 0
    first = httpx.get(api.url + "/v1/runs/101/model", params={"round": 1, "format": "protobuf"})
    assert first.content == api.models[1]
    summary = httpx.get(api.url + "/v1/runs/101/model").json()
    assert summary["k"] == 4000 and summary["round"] == 2 and summary["num_weights"] == 89_610
    assert sum(t["tracked"] for t in summary["tensors"]) == 4000
    assert httpx.get(api.url + "/v1/runs/101/models").json() == [0, 1, 2]


def test_fleet_and_profiles(api):
    nodes = {n["node_id"]: n for n in httpx.get(api.url + "/v1/nodes").json()}
    assert nodes["7"]["rounds_joined"] == 2 and nodes["7"]["profile"] == "pi4-4g"
    assert nodes["7"]["bytes_up"] == 18000 and nodes["8"]["failures"] == 2
    assert nodes["8"]["last_error"] == "budget too small"
    names = {p["name"] for p in httpx.get(api.url + "/v1/profiles").json()}
    assert {"mcu-512k", "jetson-8g"} <= names


def test_prometheus_metrics(api):
    text = httpx.get(api.url + "/metrics").text
    assert 'dropfleet_run_accuracy{run_id="101"} 0.7' in text
    assert 'dropfleet_run_bytes{direction="up",run_id="101"} 18000.0' in text
    assert "dropfleet_http_requests_total" in text


def test_long_poll_waits_for_the_next_round(api):
    api.store.start_run("303", "dropback", "mlp-90k", 0, 3, {})
    fill_later = threading.Timer(0.8, lambda: api.store.publish_round("303", 1, {"accuracy": 0.4}, None, 0))
    fill_later.start()
    t0 = time.monotonic()
    r = httpx.get(api.url + "/v1/runs/303/rounds", params={"after": 0, "wait": 10}, timeout=15)
    assert [x["round"] for x in r.json()] == [1] and 0.5 < time.monotonic() - t0 < 8
    t0 = time.monotonic()
    assert httpx.get(api.url + "/v1/runs/303/rounds", params={"after": 1, "wait": 0.5}).json() == []
    assert time.monotonic() - t0 >= 0.5


def test_server_sent_events_follow_a_run(api):
    api.store.start_run("404", "dropback", "mlp-90k", 0, 2, {})
    api.store.publish_round("404", 0, {"accuracy": 0.1}, None, 0)

    def progress():
        time.sleep(0.5)
        api.store.publish_round("404", 1, {"accuracy": 0.6}, None, 0)
        time.sleep(0.3)
        api.store.finish_run("404", "finished")

    threading.Thread(target=progress).start()
    events = []
    with httpx.stream("GET", api.url + "/v1/runs/404/events", timeout=20) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
    assert events == ["round", "round", "end"]


def test_state_changes_need_the_admin_token(api):
    assert httpx.post(api.url + "/v1/runs", json={}).status_code == 401
    bad = httpx.post(api.url + "/v1/runs", json={}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "admin bearer token" in bad.text
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(api.url + "/v1/runs", json={"run_config": {"global-k": 0}}, headers=auth)
    assert r.status_code == 400 and "'global-k' has an invalid value" in r.text
    r = httpx.post(api.url + "/v1/runs", json={"run_config": {"rounds": 3}}, headers=auth)
    assert r.status_code == 400 and "unknown run-config key" in r.text
    r = httpx.post(api.url + "/v1/runs", json={"run_config": {"fleet-mix": "pi4-4gb"}}, headers=auth)
    assert r.status_code == 400 and "unknown device profile 'pi4-4gb'" in r.text  # as simulate says it
    r = httpx.post(api.url + "/v1/runs", json={"unexpected": 1}, headers=auth)
    assert r.status_code == 422
    assert httpx.post(api.url + "/v1/runs/101/stop").status_code == 401


def test_resume_refusals_change_nothing(api):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    before = httpx.get(api.url + "/v1/runs/101").json()
    assert httpx.post(api.url + "/v1/runs/101/resume").status_code == 401
    r = httpx.post(api.url + "/v1/runs/999/resume", headers=auth)
    assert r.status_code == 404 and "run 999 not found" in r.text
    r = httpx.post(api.url + "/v1/runs/101/resume", headers=auth)  # finished
    assert r.status_code == 409 and "has finished" in r.text
    r = httpx.post(api.url + "/v1/runs/202/resume", headers=auth, timeout=120)  # the SuperLink is down
    assert r.status_code == 502 and "flwr failed" in r.json()["detail"]
    assert httpx.get(api.url + "/v1/runs/101").json() == before
    assert httpx.get(api.url + "/v1/runs/202").json()["resumes"] == 0


def test_superlink_unreachable_is_a_502_with_a_reason(api):
    r = httpx.post(
        api.url + "/v1/runs",
        json={"run_config": {}},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=120,
    )
    assert r.status_code == 502 and "flwr run failed" in r.json()["detail"]


def test_huge_upload_refused_early(api):
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n{"
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    r = httpx.post(api.url + "/v1/runs", content=b"x" * 200_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_cors_is_closed_by_default(api):
    r = httpx.options(
        api.url + "/v1/runs",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_secrets_stay_out_of_logs(api):
    httpx.post(
        api.url + "/v1/runs",
        json={"run_config": {"global-k": 0}},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert ADMIN not in api.log.read_text()


def test_status_page_is_served(api):
    r = httpx.get(api.url + "/")
    assert r.status_code == 200 and "dropfleet" in r.text and "/v1/runs" in r.text


def test_read_access_by_token(tmp_path):
    live = start_api(tmp_path, DROPFLEET_READ_ACCESS="token", DROPFLEET_READ_TOKEN=READER)
    try:
        assert httpx.get(live.url + "/v1/runs").status_code == 401
        assert (
            httpx.get(live.url + "/v1/runs", headers={"Authorization": f"Bearer {READER}"}).status_code == 200
        )
        assert (
            httpx.get(live.url + "/v1/runs", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        )
        assert httpx.get(live.url + "/v1/health").status_code == 200  # probes stay open
        assert httpx.get(live.url + "/metrics").status_code == 401  # training figures are read access
        reader = {"Authorization": f"Bearer {READER}"}
        assert "dropfleet_runs" in httpx.get(live.url + "/metrics", headers=reader).text
    finally:
        stop([live.proc])


@pytest.mark.parametrize("environment", ["development", "production"])
def test_refuses_a_placeholder_secret_in_any_environment(environment, tmp_path, monkeypatch):
    for token in ("change-me", "short"):
        with pytest.raises(ValueError, match="placeholder"):
            Settings(environment=environment, admin_token=token)
        with pytest.raises(ValueError, match="placeholder"):
            Settings(environment=environment, admin_token=ADMIN, read_token=token)
    assert Settings(environment=environment, admin_token=ADMIN).admin == ADMIN
    # No token given: a random one, created private in the state directory and kept.
    monkeypatch.setenv("DROPFLEET_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DROPFLEET_ADMIN_TOKEN", raising=False)
    made = Settings(environment=environment).admin
    assert len(made) >= 32 and (tmp_path / "admin-token").read_text() == made
    assert (tmp_path / "admin-token").stat().st_mode & 0o777 == 0o600
    assert Settings(environment=environment).admin == made
    (tmp_path / "admin-token").chmod(0o644)  # readable by others: refused, not used
    with pytest.raises(ValueError, match="private"):
        Settings(environment=environment)


def test_reads_behind_a_token_get_a_random_one_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPFLEET_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DROPFLEET_READ_TOKEN", raising=False)
    made = Settings(admin_token=ADMIN, read_access="token").read_token.get_secret_value()
    assert len(made) >= 32 and (tmp_path / "read-token").read_text() == made != ADMIN
    assert (tmp_path / "read-token").stat().st_mode & 0o777 == 0o600
    elsewhere = Settings(admin_token=ADMIN, read_access="token", read_token_file=tmp_path / "t" / "reader")
    assert elsewhere.read_token.get_secret_value() == (tmp_path / "t" / "reader").read_text() != made
    assert Settings(admin_token=ADMIN).read_token is None  # open reads: no token made


def test_a_published_api_needs_read_tokens_outside_development(tmp_path):
    """Beyond loopback, reads need a token too: `dropfleet api` refuses to start otherwise."""
    env = {**os.environ, "DROPFLEET_STATE_DIR": str(tmp_path), "DROPFLEET_ADMIN_TOKEN": ADMIN}
    env.pop("DROPFLEET_ENVIRONMENT", None)
    dropfleet = str(Path(sys.executable).parent / "dropfleet")
    for extra, host in (({}, "0.0.0.0"), ({"DROPFLEET_PUBLISHED_HOST": "192.0.2.7"}, "127.0.0.1")):
        done = subprocess.run(
            [dropfleet, "api", "--host", host, "--port", str(free_port())],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "open reads" in done.stderr + done.stdout, done.stderr
    settings = Settings(admin_token=ADMIN, read_access="token", read_token=READER)
    assert settings.exposure_problem("0.0.0.0") is None
    assert Settings(admin_token=ADMIN, environment="development").exposure_problem("0.0.0.0") is None
    assert Settings(admin_token=ADMIN).exposure_problem("127.0.0.1") is None


def test_online_state_is_unknown_when_the_superlink_is_unreachable(api):
    r = httpx.get(api.url + "/v1/nodes", params={"online": True}, timeout=120)
    assert r.status_code == 200 and {n["online"] for n in r.json()} == {None}


def _events(url, **headers):
    kinds = []
    with httpx.stream("GET", url, headers=headers, timeout=20) as r:
        for line in r.iter_lines():
            if line.startswith(("event:", "id:")):
                kinds.append(line.replace(" ", ""))
    return kinds


def test_an_eventsource_reconnect_resumes_after_its_last_event_id(api):
    url = api.url + "/v1/runs/101/events"
    assert _events(url) == ["event:round", "id:0", "event:round", "id:1", "event:round", "id:2", "event:end"]
    assert _events(url, **{"Last-Event-ID": "1"}) == ["event:round", "id:2", "event:end"]
    assert _events(url, **{"Last-Event-ID": "garbage"})[:2] == ["event:round", "id:0"]  # ignored, not a 500


def test_a_starting_run_is_followed_until_its_serverapp_takes_it(api):
    api.store.register_run("505", "dropback", "mlp-90k", 0, 1, {})
    assert httpx.get(api.url + "/v1/runs/505").json()["status"] == "starting"

    def serverapp():
        time.sleep(0.5)
        api.store.start_run("505", "dropback", "mlp-90k", 0, 1, {"num-server-rounds": 1})
        api.store.publish_round("505", 0, {"accuracy": 0.1}, None, 0)
        time.sleep(0.3)
        api.store.finish_run("505", "finished")

    threading.Thread(target=serverapp).start()
    assert _events(api.url + "/v1/runs/505/events") == ["event:round", "id:0", "event:end"]
    assert httpx.get(api.url + "/v1/runs/505").json()["status"] == "finished"


def test_nodes_online_is_one_shared_superlink_query(tmp_path):
    """Anonymous callers cannot start `flwr` processes: 12 concurrent requests share one query."""
    live = start_api(tmp_path, DROPFLEET_SUPERLINK_CACHE_SECONDS="300", DROPFLEET_RECONCILE_SECONDS="0")
    try:
        with ThreadPoolExecutor(12) as pool:
            codes = list(
                pool.map(
                    lambda _: (
                        httpx.get(live.url + "/v1/nodes", params={"online": True}, timeout=120).status_code
                    ),
                    range(12),
                )
            )
        assert codes == [200] * 12
        assert httpx.get(live.url + "/v1/nodes", params={"online": True}, timeout=120).status_code == 200
        metrics = httpx.get(live.url + "/metrics").text
        assert 'dropfleet_superlink_queries_total{query="nodes"} 1.0' in metrics
    finally:
        stop([live.proc])


def test_without_a_superlink_connection_nothing_is_started_and_runs_answer_503(tmp_path):
    """A bare API serves its store; it never starts a SuperLink of its own for anyone."""
    live = start_api(tmp_path, DROPFLEET_FLOWER_CONNECTION="", DROPFLEET_SUPERLINK_CACHE_SECONDS="0.5")
    try:
        fill(live.store, "1")
        for _ in range(3):  # anonymous and repeated: each would have started a local SuperLink
            nodes = httpx.get(live.url + "/v1/nodes", params={"online": True}, timeout=30)
            assert nodes.status_code == 200 and {n["online"] for n in nodes.json()} <= {None}
            time.sleep(0.6)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for method, path in (
            ("POST", "/v1/runs"),
            ("POST", "/v1/runs/1/stop"),
            ("POST", "/v1/runs/1/resume"),
        ):
            r = httpx.request(method, live.url + path, headers=auth, json={"run_config": {}}, timeout=30)
            assert r.status_code == 503 and "DROPFLEET_FLOWER_CONNECTION" in r.json()["detail"], (
                path,
                r.text,
            )
        assert httpx.get(live.url + "/v1/runs/1", timeout=30).status_code == 200  # the store still answers
        assert processes_mentioning(str(tmp_path / "flwr")) == []
        assert not (tmp_path / "flwr").exists()  # not even Flower's home was made
    finally:
        stop([live.proc])


def test_run_config_from_rest_names_no_path_and_no_signature(api):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for key in (
        "results-file",
        "store-url",
        "message-audit",
        "fashion-mnist-dir",
        "app-signature",
        "resume-run",
    ):
        r = httpx.post(api.url + "/v1/runs", headers=auth, json={"run_config": {key: "/etc/x"}}, timeout=30)
        assert r.status_code == 400 and key in r.json()["detail"], r.text


def test_followers_are_capped_and_their_slots_come_back(tmp_path):
    """SSE streams and long-polls hold a connection each: past the cap a follower gets 503,
    probes stay quick, and a slot is free again once its follower leaves."""
    live = start_api(tmp_path, DROPFLEET_MAX_FOLLOWERS="3")
    try:
        fill(live.store, "1", status="running")
        events = live.url + "/v1/runs/1/events?after=5"
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                r = stack.enter_context(httpx.stream("GET", events, timeout=30))
                assert r.status_code == 200
            refused = httpx.get(events, timeout=30)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            poll = httpx.get(live.url + "/v1/runs/1/rounds", params={"after": 5, "wait": 2}, timeout=30)
            assert poll.status_code == 503  # a long-poll is a follower too
            assert httpx.get(live.url + "/v1/health", timeout=5).status_code == 200
            assert httpx.get(live.url + "/v1/runs/1/rounds", timeout=5).status_code == 200  # no wait: no slot
        deadline = time.monotonic() + 10
        while (
            httpx.get(events.replace("events", "rounds"), params={"wait": 0.2}, timeout=30).status_code != 200
        ):
            assert time.monotonic() < deadline, "the closed streams' slots never came back"
            time.sleep(0.2)
        with httpx.stream("GET", events, timeout=30) as again:
            assert again.status_code == 200
    finally:
        stop([live.proc])
