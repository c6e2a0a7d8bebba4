"""Fleet scale: 1,000, 3,000 and 10,000 simulated devices, 100 sampled per round, on one machine.

    python bench/fleet_scale.py [--quick] [--fleets 1000,3000,10000] [--per-round 100] [--rounds 3]

Runs the DropBack app on Flower's Simulation Engine (`flwr run`, Ray; one CPU
per ClientApp actor) once per fleet size and reports, side by side:
- start-up: seconds from launch until the ServerApp wrote its initial
  evaluation (SuperLink, the ServerApp and the first evaluation);
- seconds of the first round (Ray and the ClientApp actors start in it) and
  of later rounds, from the ServerApp's own round report;
- peak resident memory summed over every process the run started, and per
  part: the SuperLink, the simulation process (ServerApp and Flower's engine),
  the ClientApp actors, Ray's own daemons; /proc is sampled every 0.2 s (an
  upper bound: pages shared between processes count once per process);
- CPU seconds per part, which says what dominates as the fleet grows.
The devices train on IID partitions (60,000 examples over the fleet), so the
figures measure orchestration far more than training.
"""

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("superlink", "serverapp+engine", "clientapp actors", "ray daemons", "other")


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def _part(cmdline: str) -> str:
    if "flower-superlink" in cmdline:
        return "superlink"
    if "flwr-simulation" in cmdline or "flwr-serverapp" in cmdline:
        return "serverapp+engine"
    if cmdline.startswith("ray::"):
        return "clientapp actors"
    if "ray" in cmdline:
        return "ray daemons"
    return "other"


class Sampler(threading.Thread):
    """Per part: peak summed RSS and CPU seconds of the processes started after `since`.

    Also notes when the results file first holds the initial evaluation (round 0).
    """

    def __init__(self, since: float, results: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.since, self.results, self.interval = since, results, interval
        self.peak_total = 0
        self.peak: dict[str, int] = defaultdict(int)
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (part, last CPU seconds seen)
        self.ready_at: float | None = None
        self._done = threading.Event()
        self._boot = _boot_time()

    def _sample(self) -> None:
        rss: dict[str, int] = defaultdict(int)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                rss_pages = int((entry / "statm").read_text().split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if self._boot + int(stat[19]) / TICKS < self.since:
                continue
            pid = int(entry.name)
            # A zombie has no command line: it keeps the part it was first seen in.
            part = self.cpu[pid][0] if pid in self.cpu and not cmdline else _part(cmdline)
            rss[part] += rss_pages * PAGE
            self.cpu[pid] = (part, (int(stat[11]) + int(stat[12])) / TICKS)
        self.peak_total = max(self.peak_total, sum(rss.values()))
        for part, value in rss.items():
            self.peak[part] = max(self.peak[part], value)
        if self.ready_at is None and self.results.exists():
            if any(r["round"] == 0 for r in read_results(self.results)["rounds"]):
                self.ready_at = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for part, seconds in self.cpu.values():
            out[part] += seconds
        return dict(out)


def measure(nodes: int, per_round: int, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="dropfleet-scale-") as tmp:
        work = Path(tmp)
        results = work / "run.jsonl"
        config = {
            "num-server-rounds": rounds,
            "fraction-train": per_round / nodes,
            "fraction-evaluate": 0.0,
            "min-available-nodes": nodes,
            "min-train-nodes": max(1, per_round * 4 // 5),  # devices may be unavailable (profiles)
            "partitioner": "iid",  # Dirichlet needs 10 examples per device: at most 6,000 devices
            "results-file": str(results),
            "store-url": f"sqlite:///{work / 'store.db'}",
        }
        t0 = time.monotonic()
        sampler = Sampler(since=time.time() - 0.5, results=results)
        sampler.start()
        code = run_simulation(nodes, config, work / "flwr", timeout=3600).code
        wall = time.monotonic() - t0
        sampler.stop()
        if code != 0:
            raise SystemExit(f"flwr run exited with {code}")
        rows = read_results(results)["rounds"]
    trained = rows[1:]
    seconds = [r["seconds"] for r in trained]
    return {
        "nodes": nodes,
        "sampled_per_round": per_round,
        "rounds": rounds,
        "replied": [r["replied"] for r in trained],
        "seconds_per_round": seconds,
        "first_round_seconds": seconds[0],  # Ray and the ClientApp actors start in it
        "mean_seconds_per_round": sum(seconds[1:]) / len(seconds[1:]),
        "startup_seconds": (sampler.ready_at or t0) - t0,
        "wall_seconds": wall,
        "peak_rss_bytes": sampler.peak_total,
        "peak_rss_bytes_by_part": dict(sampler.peak),
        "cpu_seconds_by_part": sampler.cpu_seconds(),
        "final_accuracy": rows[-1]["accuracy"],
    }


def _print(reports: list[dict]) -> None:
    base = reports[0]
    print(f"Fleet scale on {os.cpu_count()} cores, {base['sampled_per_round']} devices sampled per round")
    print(f"  {'devices':>26} " + " ".join(f"{r['nodes']:>10,}" for r in reports))
    rows = [
        ("start-up s", lambda r: f"{r['startup_seconds']:.0f}"),
        ("first round s (Ray starts)", lambda r: f"{r['first_round_seconds']:.1f}"),
        ("s per later round (mean)", lambda r: f"{r['mean_seconds_per_round']:.1f}"),
        (
            "  / smallest fleet",
            lambda r: f"{r['mean_seconds_per_round'] / base['mean_seconds_per_round']:.1f}x",
        ),
        ("replied per round", lambda r: "/".join(str(x) for x in r["replied"])),
        ("peak RSS GiB, all", lambda r: f"{r['peak_rss_bytes'] / 2**30:.2f}"),
    ]
    rows += [
        (f"  {part}", lambda r, p=part: f"{r['peak_rss_bytes_by_part'].get(p, 0) / 2**30:.2f}")
        for part in PARTS
    ]
    rows += [("CPU s, by part", lambda r: "")]
    rows += [(f"  {part}", lambda r, p=part: f"{r['cpu_seconds_by_part'].get(p, 0):.0f}") for part in PARTS]
    rows += [("wall s", lambda r: f"{r['wall_seconds']:.0f}")]
    for label, cell in rows:
        print(f"  {label:>26} " + " ".join(f"{cell(r):>10}" for r in reports))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 300 devices, 10 per round, 2 rounds")
    parser.add_argument("--fleets", default="1000,3000,10000", help="comma-separated fleet sizes")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench-fleet-scale.json"))
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round includes Ray's start)")
    if args.quick:
        fleets, per_round, rounds = [100, 300], 10, 2
    else:
        fleets, per_round, rounds = [int(x) for x in args.fleets.split(",")], args.per_round, args.rounds
    reports = [measure(n, per_round, rounds) for n in fleets]
    _print(reports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
