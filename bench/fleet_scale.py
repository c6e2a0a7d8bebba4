"""Fleet scale: 1,000 simulated devices, 50 sampled per round, on one machine.

    python bench/fleet_scale.py [--quick] [--nodes 1000] [--per-round 50] [--rounds 3]

Runs the DropBack app on Flower's Simulation Engine (`flwr run`, Ray; one CPU
per ClientApp actor) and reports seconds per round (from the ServerApp's own
round report) and the peak resident memory of everything the run started
(SuperLink, ServerApp, Ray and its actors): /proc is sampled every 0.2 s and
the RSS of every process born after the benchmark started is summed (an upper
bound: pages shared between processes count once per process).
"""

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


class RssSampler(threading.Thread):
    """Peak summed RSS of the processes started after `since` (wall-clock seconds)."""

    def __init__(self, since: float, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.since, self.interval = since, interval
        self.peak = 0
        self._done = threading.Event()
        self._boot = _boot_time()

    def _sample(self) -> int:
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                rss_pages = int((entry / "statm").read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue
            start = self._boot + int(stat.rsplit(")", 1)[1].split()[19]) / TICKS
            if start >= self.since:
                total += rss_pages * PAGE
        return total

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._sample())
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 devices, 10 per round, 2 rounds")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench-fleet-scale.json"))
    args = parser.parse_args()
    nodes, per_round, rounds = (100, 10, 2) if args.quick else (args.nodes, args.per_round, args.rounds)
    with tempfile.TemporaryDirectory(prefix="dropfleet-scale-") as tmp:
        work = Path(tmp)
        results = work / "run.jsonl"
        config = {
            "num-server-rounds": rounds,
            "fraction-train": per_round / nodes,
            "fraction-evaluate": 0.0,
            "min-available-nodes": nodes,
            "min-train-nodes": max(1, per_round * 4 // 5),  # devices may be unavailable (profiles)
            "partitioner": "iid",  # Dirichlet over 1,000 devices leaves some nearly empty
            "results-file": str(results),
            "store-url": f"sqlite:///{work / 'store.db'}",
        }
        sampler = RssSampler(since=time.time() - 0.5)
        sampler.start()
        t0 = time.monotonic()
        code = run_simulation(nodes, config, work / "flwr", timeout=3600).code
        wall = time.monotonic() - t0
        peak = sampler.stop()
        if code != 0:
            raise SystemExit(f"flwr run exited with {code}")
        rows = read_results(results)["rounds"]
    trained = rows[1:]
    per_round_s = [r["seconds"] for r in trained]
    report = {
        "nodes": nodes,
        "sampled_per_round": per_round,
        "rounds": rounds,
        "replied": [r["replied"] for r in trained],
        "seconds_per_round": per_round_s,
        "mean_seconds_per_round": sum(per_round_s) / len(per_round_s),
        "final_accuracy": rows[-1]["accuracy"],
        "peak_rss_bytes": peak,
        "wall_seconds": wall,
        "cpus": os.cpu_count(),
    }
    mean = report["mean_seconds_per_round"]
    print(f"Fleet scale on {os.cpu_count()} cores: {nodes} devices, {per_round} sampled per round")
    print(f"  replied per round               {report['replied']}")
    print(f"  seconds per round               {', '.join(f'{s:.1f}' for s in per_round_s)} (mean {mean:.1f})")
    print(f"  peak RSS, all started processes {peak / 2**30:.2f} GiB")
    print(f"  wall time including start-up    {wall:.0f} s")
    print(f"  accuracy after {rounds} rounds        {100 * rows[-1]['accuracy']:.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
