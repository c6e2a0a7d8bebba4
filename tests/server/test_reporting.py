"""The results file: a run appends to it, never truncates it, and never writes into another kind of file."""

import io
import json
import os
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


def test_a_symbolic_link_or_a_fifo_is_refused_and_its_target_untouched(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("secret\n")
    link = tmp_path / "results.jsonl"
    link.symlink_to(key)
    with pytest.raises(ConfigError, match="symbolic link"):
        record(link, "5", 0.1)
    assert key.read_text() == "secret\n"
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        record(fifo, "6", 0.1)  # refused at once: opening it does not wait for a reader


def test_the_file_is_opened_once_so_a_swap_by_name_cannot_redirect_a_run(tmp_path):
    path, key = tmp_path / "results.jsonl", tmp_path / "server.key"
    key.write_text("secret\n")
    recorder = RoundRecorder("dropback", 1, path, Console(file=io.StringIO()), run_id="7", header={})
    moved = tmp_path / "moved.jsonl"
    path.rename(moved)
    path.symlink_to(key)  # swapped for a link after the run opened its file
    recorder.record(RoundStats(round=0, strategy="dropback", accuracy=0.5, loss=1.0))
    recorder.end("finished")
    recorder.close()
    assert key.read_text() == "secret\n"
    assert [x["type"] for x in map(json.loads, moved.read_text().splitlines())] == ["header", "round", "end"]
