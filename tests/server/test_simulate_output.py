"""`dropfleet simulate`'s own lines: rounds read from the results file, Flower's output in a log beside it."""

import io
import json

from rich.console import Console

from dropfleet.cli import simulate
from dropfleet.cli.simulate import RoundTable, log_path_for
from dropfleet.server.reporting import RoundRecorder, RoundStats, round_line
from dropfleet.server.simulation import RunLog, log_tail


def _record(path, run_id: str, rounds: int, console: Console) -> None:
    recorder = RoundRecorder("dropback", rounds, path, console, run_id=run_id, header={"run_id": run_id})
    for r in range(rounds + 1):
        recorder.record(
            RoundStats(
                round=r, strategy="dropback", sampled=3, replied=3, accuracy=0.5 + r / 10, loss=1 / (r + 1)
            )
        )
    recorder.end("finished")
    recorder.close()


def test_the_table_prints_this_runs_rounds_as_the_serverapp_does(tmp_path, monkeypatch):
    path = tmp_path / "demo.jsonl"
    _record(path, "1", 1, Console(file=io.StringIO()))  # an earlier run in the same file
    screen = io.StringIO()
    monkeypatch.setattr(simulate, "console", Console(file=screen, highlight=False, width=400))
    table = RoundTable(str(path), log_path_for(str(path)), 3, show_rounds=True)
    table.update("Starting local SuperLink", None)
    assert screen.getvalue() == ""
    served = io.StringIO()
    _record(path, "2", 2, Console(file=served, highlight=False, width=400, force_terminal=False))
    table.update("Successfully started run 2", "2")
    lines = screen.getvalue().splitlines()
    log = tmp_path / "demo.log"
    assert lines[0] == f"run 2 started on 3 simulated devices; Flower's and Ray's log: {log}"
    rows = [x for x in served.getvalue().splitlines() if x.startswith(("dropback", "round  "))]
    assert lines[1:] == rows and len(rows) == 3  # the initial model and two rounds, not run 1's
    table.poll()
    assert len(screen.getvalue().splitlines()) == 4  # nothing twice


def test_a_half_written_line_waits_for_the_next_poll(tmp_path, monkeypatch):
    path = tmp_path / "{run_id}.jsonl"
    screen = io.StringIO()
    monkeypatch.setattr(simulate, "console", Console(file=screen, highlight=False, width=400))
    table = RoundTable(str(path), log_path_for(str(path)), 1, show_rounds=True)
    table.update("", "7")  # the results file does not exist yet
    row = {"type": "round", "round": 0, "strategy": "fedavg", "accuracy": 0.1, "loss": 2.3}
    text = json.dumps(row) + "\n"
    (tmp_path / "7.jsonl").write_text(text[:10])
    table.poll()
    with (tmp_path / "7.jsonl").open("a") as fh:
        fh.write(text[10:])
    table.poll()
    assert screen.getvalue().splitlines()[1:] == [Console().render_str(round_line(row)).plain]


def test_the_log_sits_beside_the_results_and_is_never_them():
    assert log_path_for("/r/demo.jsonl") == "/r/demo.log"
    assert log_path_for("/r/{run_id}.jsonl") == "/r/{run_id}.log"
    assert log_path_for("/r/out.log") == "/r/out.log.flwr.log"


def test_the_log_is_named_by_the_run_id_once_known_without_colours(tmp_path):
    log = RunLog(tmp_path / "{run_id}.log")
    log.write("\x1b[92mINFO \x1b[0m:      Starting\n")
    pending = log.path
    assert pending.name.startswith("pending-") and pending.exists()
    log.name_run("42")
    log.write("after\n")
    log.close()
    assert not pending.exists() and log.path == tmp_path / "42.log"
    assert log.path.read_text() == "INFO :      Starting\nafter\n"
    assert log_tail(log.path, 1) == ["after"] and log_tail(tmp_path / "missing.log") == []
