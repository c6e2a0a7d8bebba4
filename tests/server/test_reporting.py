"""The results file: a run appends to it, never truncates it, and never writes into another kind of file."""

import io
import sqlite3

import pytest
from rich.console import Console

from dropfleet.common.errors import ConfigError
from dropfleet.server.reporting import RoundRecorder, RoundStats, read_results


def record(path, run_id: str, accuracy: float) -> None:
    recorder = RoundRecorder(
        "dropback", 1, path, Console(file=io.StringIO()), run_id=run_id, header={"run_id": run_id}
    )
    recorder.record(RoundStats(round=0, strategy="dropback", accuracy=accuracy, loss=1.0))
    recorder.end("finished")
    recorder.close()


def test_a_second_run_appends_and_reading_gives_the_latest(tmp_path):
    path = tmp_path / "results.jsonl"
    record(path, "1", 0.25)
    first = path.read_text()
    record(path, "2", 0.5)
    assert path.read_text().startswith(first)  # the first run's lines are all still there
    latest = read_results(path)
    assert latest["header"]["run_id"] == "2" and [r["accuracy"] for r in latest["rounds"]] == [0.5]
    assert latest["end"]["status"] == "finished"


def test_a_file_that_is_not_a_results_file_is_refused_untouched(tmp_path):
    db = tmp_path / "dropfleet.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table runs (id integer)")
    log = tmp_path / "notes.txt"
    log.write_text("the operator's notes\n")
    for path in (db, log):
        before = path.read_bytes()
        with pytest.raises(ConfigError, match="not a dropfleet results file"):
            record(path, "3", 0.1)
        assert path.read_bytes() == before
    with pytest.raises(ConfigError, match="not a regular file"):
        record(tmp_path, "4", 0.1)
