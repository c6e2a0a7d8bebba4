"""What a board runs for a round, torch path against lean path: peak RSS per process and seconds per round.

    python bench/board.py [--quick] [--models mlp-90k,cnn-bn-prelu] [--rounds 3] [--train-subset 1200]

For each model and runtime, a process fleet (`dropfleet fleet up`: TLS, node
authentication, signed apps) with one board per profile (mlp-90k: a
pi-zero-512m and a pi4-4g; the CNN, at batch 8: a pi4-4g and a jetson-8g, the
boards whose budgets hold its step) trains a short run
started through the REST API. Torch boards train their partitions of
Fashion-MNIST; lean boards (no torch imported) the same partitions, cut into
each board's own data-dir at fleet up, as a real board holds its data. Reported
side by side:
- per board: the peak RSS (VmHWM) of its SuperNode, its SuperExec and its
  ClientApp processes (one per message; the largest), and their sum, which the
  board's ClientApp also reports itself (`board_rss_bytes`, checked against
  ours), against the profile's RAM;
- seconds per training round (the server's own round timing);
- the server's processes: SuperLink, proxy, the server's SuperExec, the
  ServerApp, the REST API (peak RSS);
- the global model's accuracy after the same rounds on both paths.
/proc is sampled every 0.2 s for the short-lived processes (ServerApp,
ClientApps): each one's VmHWM is its peak up to its last sample. RSS counts a
page shared between processes (libpython, NumPy's libraries) once per process:
the sum over-states what the board's RAM holds, which makes it a safe bound.
"""

import argparse
import json
import shutil
import tempfile
import threading
from pathlib import Path

import httpx

from dropfleet.client.footprint import peak_rss
from dropfleet.deploy.fleet import down, free_port_range, up
from dropfleet.deploy.topology import FleetSpec
from dropfleet.fleet.profiles import get_profile

MIB = 2**20
SERVER_PARTS = ("superlink", "proxy", "superexec-serverapp", "serverapp", "api")


def _children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == ppid:
                out.append(int(entry.name))
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split among the processes that map them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Every 0.2 s until stopped: the largest VmHWM among each parent's children, and the largest
    PSS of each board (its SuperNode, SuperExec and their children summed at one instant)."""

    def __init__(self, parents: dict[str, int], boards: dict[str, tuple[int, int]]) -> None:
        super().__init__(daemon=True)
        self.parents, self.peaks, self.stop = parents, dict.fromkeys(parents, 0), threading.Event()
        self.boards, self.pss = boards, dict.fromkeys(boards, 0)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, pid in self.parents.items():
                for child in _children(pid):
                    self.peaks[name] = max(self.peaks[name], peak_rss(child) or 0)
            for name, (supernode, superexec) in self.boards.items():
                now = sum(_pss(p) for p in (supernode, superexec, *_children(superexec)))
                self.pss[name] = max(self.pss[name], now)


def _pids(state: Path) -> dict[str, int]:
    return {p.stem: json.loads(p.read_text())["pid"] for p in (state / "pids").glob("*.json")}


# What each model trains with: the CNN's activations at batch 32 exceed the small boards' budgets,
# so it runs at batch 8 on the boards whose budget holds that (docs/benchmarks.md, device memory).
MODELS = {
    "mlp-90k": ({"batch-size": 32}, ("pi-zero-512m", "pi4-4g")),
    "cnn-bn-prelu": ({"batch-size": 8}, ("pi4-4g", "jetson-8g")),
}


def measure(model: str, runtime: str, profiles: list[str], rounds: int, subset: int) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"board-{runtime}-"))
    n = len(profiles)
    base = free_port_range(4 + n)
    spec = FleetSpec(
        nodes=n,
        profiles=tuple(profiles),
        runtime=runtime,
        superlink_port=base,
        api_port=base + 2,
        node_port_base=base + 4,
        state_dir=state,
    )
    info = up(spec, timeout=180)
    try:
        pids = _pids(state)
        sampler = Sampler(
            {"serverapp": pids["superexec-serverapp"]}
            | {f"clientapp-{i}": pids[f"superexec-clientapp-{i}"] for i in range(n)},
            {f"board-{i}": (pids[f"supernode-{i}"], pids[f"superexec-clientapp-{i}"]) for i in range(n)},
        )
        sampler.start()
        token = Path(info["admin_token_file"]).read_text()
        api = info["api"]
        config = {
            **MODELS[model][0],
            "model-id": model,
            "num-server-rounds": rounds,
            "train-subset": subset,
            "min-available-nodes": n,
            "min-train-nodes": n,
            "fraction-evaluate": 0.0,
        }
        admin = {"Authorization": f"Bearer {token}"}
        started = httpx.post(f"{api}/v1/runs", headers=admin, json={"run_config": config}, timeout=180)
        if started.status_code != 202:
            raise SystemExit(f"POST /v1/runs {model} ({runtime}): {started.status_code} {started.text}")
        run_id = started.json()["run_id"]
        with httpx.stream("GET", f"{api}/v1/runs/{run_id}/events", timeout=3600) as stream:
            for _ in stream.iter_lines():
                pass
        sampler.stop.set()
        sampler.join()
        run_rounds = httpx.get(f"{api}/v1/runs/{run_id}/rounds", timeout=60).json()
        nodes = {node["partition_id"]: node for node in httpx.get(f"{api}/v1/nodes", timeout=60).json()}
        trained = [r for r in run_rounds if r["round"] > 0]
        boards = {}
        for i, profile in enumerate(profiles):
            supernode = peak_rss(pids[f"supernode-{i}"]) or 0
            superexec = peak_rss(pids[f"superexec-clientapp-{i}"]) or 0
            clientapp = sampler.peaks[f"clientapp-{i}"]
            node = nodes.get(i, {})
            boards[profile] = {
                "supernode_mib": supernode / MIB,
                "superexec_mib": superexec / MIB,
                "clientapp_mib": clientapp / MIB,
                "board_mib": (supernode + superexec + clientapp) / MIB,
                "reported_board_mib": (node.get("board_rss_bytes") or 0) / MIB,
                "board_pss_mib": sampler.pss[f"board-{i}"] / MIB,
                "ram_mib": get_profile(profile).memory_bytes / MIB,
                "trainer": node.get("trainer"),
            }
        server = {name: (peak_rss(pids[name]) or 0) / MIB for name in SERVER_PARTS if name in pids}
        server["serverapp"] = sampler.peaks["serverapp"] / MIB
        return {
            "model": model,
            "runtime": runtime,
            "status": trained[-1]["round"] == rounds if trained else False,
            "seconds_per_round": sum(r["seconds"] for r in trained) / max(1, len(trained)),
            "accuracy": trained[-1]["accuracy"] if trained else None,
            "boards": boards,
            "server_mib": server,
        }
    finally:
        down(state)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp-90k,cnn-bn-prelu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="mlp-90k only, 2 rounds of 300 examples")
    parser.add_argument("--out", type=Path, default=Path("results/bench-board.json"))
    args = parser.parse_args()
    models = ["mlp-90k"] if args.quick else args.models.split(",")
    rounds, subset = (2, 300) if args.quick else (args.rounds, args.train_subset)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for m in models:
        for runtime in ("torch", "lean"):
            results.append(measure(m, runtime, list(MODELS[m][1]), rounds, subset))
            args.out.write_text(json.dumps(results, indent=2))
    unfinished = [f"{r['model']} on {r['runtime']}" for r in results if not r["status"]]
    unreported = [
        f"{r['model']} {profile}"
        for r in results
        if r["runtime"] == "lean"
        for profile, board in r["boards"].items()
        if not board["reported_board_mib"]
    ]
    if unfinished or unreported:  # a board that did not train, or did not report its footprint
        raise SystemExit(f"unfinished runs: {unfinished}; lean boards without a footprint: {unreported}")
    for m in models:
        profiles = MODELS[m][1]
        torch_run, lean_run = (r for r in results if r["model"] == m)
        print(f"\n{m}: {rounds} rounds of {subset} examples per board")
        head = f"  {'':14} {'torch MiB':>10} {'lean MiB':>9} {'lean/torch':>10}"
        print(head + "   (supernode + superexec + clientapp)")
        for profile in profiles:
            t, lean = torch_run["boards"][profile], lean_run["boards"][profile]
            parts = " + ".join(f"{lean[k]:.0f}" for k in ("supernode_mib", "superexec_mib", "clientapp_mib"))
            print(
                f"  {profile:14} {t['board_mib']:10.0f} {lean['board_mib']:9.0f} "
                f"{lean['board_mib'] / t['board_mib']:10.2f}   lean: {parts};"
                f" reported {lean['reported_board_mib']:.0f}; PSS {lean['board_pss_mib']:.0f} (torch"
                f" {t['board_pss_mib']:.0f}); RAM {lean['ram_mib']:.0f}; {lean['trainer']}"
            )
        ratio = lean_run["seconds_per_round"] / torch_run["seconds_per_round"]
        print(f"  s/round lean/torch: {ratio:.2f}")
        acc = (lean_run["accuracy"] or 0) - (torch_run["accuracy"] or 0)
        accuracies = f"torch {torch_run['accuracy']:.4f}, lean {lean_run['accuracy']:.4f}"
        print(f"  accuracy {accuracies} ({100 * acc:+.2f} points)")
        server = ", ".join(f"{k} {v:.0f}" for k, v in lean_run["server_mib"].items())
        print(f"  server peak RSS (MiB, lean run): {server}")


if __name__ == "__main__":
    main()
