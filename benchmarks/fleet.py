"""Fleet throughput on a local Ray cluster of 1, 2 and 3 nodes.

    .venv/bin/python benchmarks/fleet.py [--sandboxes 12] [--commands 60] [--out results/fleet.json]

All nodes run on THIS machine (2 cores here): every node shares the same CPUs, so adding a
node adds capacity (``smolvm`` units, data dirs, host actors) but not compute. The figures
show the fleet layer's overhead and that throughput does not collapse as nodes are added;
they are not a scaling curve of real machines.

Measured per node count:
  ready_per_s     sandboxes made ready per second: ``fleet.sandbox()`` calls from
                  ``--sandboxes`` threads at once (each a restore on its node), until all
                  answered their first command (``sandbox_ready_s``: each one's own time)
  commands_per_s  ``run("true")`` round trips per second over the cluster, from one thread
                  per sandbox into already-running sandboxes (``command_s``: each call)
Output: JSON with medians and nearest-rank p95.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Ray binds 127.0.0.1 only for this run (read when ray is imported; its processes inherit it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
from ray.cluster_utils import Cluster

from stats import summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from smolvm.fleet import Fleet

PER_NODE = 4


def measure(n_nodes: int, sandboxes: int, commands: int, root: Path) -> dict:
    def args(i: int) -> dict:
        d = root / f"n{n_nodes}-{i}"
        d.mkdir(parents=True, exist_ok=True)
        return {"num_cpus": 1, "resources": {"smolvm": PER_NODE}, "env_vars": {"SMOLVM_DATA_DIR": str(d)},
                "include_dashboard": False}  # fmt: skip

    cluster = Cluster(initialize_head=True, head_node_args=args(0))
    for i in range(1, n_nodes):
        cluster.add_node(**args(i))
    ray.init(address=cluster.address, namespace="smolvm", log_to_driver=False)
    try:
        fleet = Fleet()
        fleet.map(["true"] * n_nodes)  # untimed warm-up: each node restored once
        n = min(sandboxes, n_nodes * PER_NODE)
        ready: list[float] = []
        made: list = []
        lock = threading.Lock()

        def make() -> None:
            t = time.perf_counter()
            sb = fleet.sandbox()
            sb.run("true")
            with lock:
                ready.append(time.perf_counter() - t)
                made.append(sb)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=make) for _ in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ready_wall = time.perf_counter() - t0
        per_call: list[float] = []

        def hammer(sb) -> None:
            for _ in range(max(1, commands // len(made))):
                t = time.perf_counter()
                sb.run("true", shell="raw")
                with lock:
                    per_call.append(time.perf_counter() - t)

        t1 = time.perf_counter()
        threads = [threading.Thread(target=hammer, args=(sb,)) for sb in made]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        cmd_wall = time.perf_counter() - t1
        nodes_used = len({sb.node_id for sb in made})
        fleet.close()
        return {
            "nodes": n_nodes,
            "sandboxes": n,
            "nodes_used": nodes_used,
            "ready_per_s": round(n / ready_wall, 3),
            "sandbox_ready_s": summary(ready),
            "commands": len(per_call),
            "commands_per_s": round(len(per_call) / cmd_wall, 2),
            "command_s": summary(per_call),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=12)
    p.add_argument("--commands", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fleet.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="smolvm-fleet-bench-") as d:
        runs = [measure(k, a.sandboxes, a.commands, Path(d)) for k in (1, 2, 3)]
    out = {
        "note": "all nodes share this machine's 2 cores: more nodes = more capacity, not more compute",
        "per_node": PER_NODE,
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
