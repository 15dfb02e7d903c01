"""Our side of benchmarks/run.py: SmolVM's operations, timed in this process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from hostcost import idle_cpu_percent, sandbox_pids
from peer_quicksand import rss_kib
from stats import summary


def log(msg: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float], scale: float = 1.0, nd: int = 4) -> dict:
    return summary(xs, scale, nd)


def rss_of(pid: int | None) -> dict:
    """VmRSS/Rss*/Pss in KiB: the same reader the peer script uses (stdlib only)."""
    return rss_kib(pid) if pid else {}


class Ours:
    def __init__(self, data_dir: Path, idle_s: float = 10.0) -> None:
        self.d = data_dir
        self.idle_s = idle_s
        #: P4: percent of one core each idle sandbox used (QEMU + helpers), by how it started.
        self.idle_cpu: dict[str, list[float]] = {"restored": [], "pooled": [], "cold": []}
        self.r: dict[str, list] = {
            k: []
            for k in (
                "restore_total",
                "restore_first",
                "restore_stop",
                "pool_handout",
                "pool_first",
                "pool_stop",
                "cold_first",
                "cold_total",
                "cold_stop",
                "snapshot_file",
                "snapshot_stream",
                "warm_login",
                "warm_raw",
            )
        }
        self.rss: dict[str, list] = {"restored": [], "pooled": [], "cold": []}

    def prepare(self) -> None:
        from smolvm import SmolVM

        log("ours: warm-up (untimed): the image, its boot snapshot, one restore")
        with SmolVM(data_dir=self.d) as vm:
            assert vm.info.snapshot, "SmolVM() did not restore the image's boot snapshot"
            vm.run("true")
            self.guest_mib = vm.info.config.mem_size_mib

    def restore_round(self, measure_rss: bool = False) -> None:
        from smolvm import SmolVM

        t0 = time.perf_counter()
        with SmolVM(data_dir=self.d) as vm:
            vm.run("true")
            t1 = time.perf_counter()
            if measure_rss:
                self.idle_costs("restored", vm)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        self.r["restore_first"].append(t1 - t0)
        self.r["restore_stop"].append(t3 - t2)
        if not measure_rss:
            self.r["restore_total"].append(t3 - t0)

    def pool_round(self, pool, measure_rss: bool = False) -> None:
        from smolvm import SmolVM

        if not pool.wait_ready(timeout=120):
            raise RuntimeError(f"pool did not fill: {pool.stats()}")
        t0 = time.perf_counter()
        vm = SmolVM(pool=pool)
        t1 = time.perf_counter()
        vm.run("true")
        t2 = time.perf_counter()
        if pool.handed_out == 0 or vm.info.snapshot is None:
            raise RuntimeError("the pool did not serve the sandbox")
        if measure_rss:
            self.idle_costs("pooled", vm)
        t3 = time.perf_counter()
        vm.__exit__(None, None, None)
        self.r["pool_stop"].append(time.perf_counter() - t3)
        self.r["pool_handout"].append(t1 - t0)
        self.r["pool_first"].append(t2 - t0)
        pool.handed_out = 0

    def cold_round(self, snapshot: bool) -> None:
        from smolvm import SmolVM

        t0 = time.perf_counter()
        with SmolVM(data_dir=self.d, cold_boot=True) as vm:
            vm.run("true")
            t1 = time.perf_counter()
            if snapshot:
                self.idle_costs("cold", vm)
                name = f"bench-{os.getpid()}-{len(self.r['snapshot_file'])}"
                a = time.perf_counter()
                info = vm.snapshot(name)
                self.r["snapshot_file"].append(time.perf_counter() - a)
                assert info.memory == "file"
                vm.run("true")
            t2 = time.perf_counter()
        self.r["cold_stop"].append(time.perf_counter() - t2)
        self.r["cold_first"].append(t1 - t0)
        if not snapshot:
            self.r["cold_total"].append(time.perf_counter() - t0)
        else:
            _delete_snapshot(self.d, name)

    def idle_costs(self, kind: str, vm) -> None:
        """After 2 s idle: the QEMU's RSS, then the CPU all the sandbox's host processes use
        over ``idle_s`` seconds."""
        time.sleep(2)
        self.rss[kind].append(rss_of(vm.info.pid))
        pids = sandbox_pids(vm.vm_id)
        if not pids:
            raise RuntimeError(f"no host processes found for {vm.vm_id}")
        self.idle_cpu[kind].append(idle_cpu_percent(pids, self.idle_s))

    def stream_snapshot_round(self) -> None:
        from smolvm import SmolVM

        with SmolVM(data_dir=self.d) as vm:
            vm.run("echo x > /root/x")
            name = f"bench-s-{os.getpid()}-{len(self.r['snapshot_stream'])}"
            a = time.perf_counter()
            vm.snapshot(name)
            self.r["snapshot_stream"].append(time.perf_counter() - a)
        _delete_snapshot(self.d, name)

    def warm(self, n: int) -> None:
        from smolvm import SmolVM

        with SmolVM(data_dir=self.d) as vm:
            for _ in range(5):
                vm.run("true")
            for _ in range(n):
                a = time.perf_counter()
                vm.run("true")
                self.r["warm_login"].append(time.perf_counter() - a)
                a = time.perf_counter()
                vm.run("true", shell="raw")
                self.r["warm_raw"].append(time.perf_counter() - a)

    def concurrent(self, n: int) -> dict:
        from smolvm import SmolVM

        firsts: list[float] = []
        rss: list[dict] = []
        errors: list[str] = []
        ready = threading.Barrier(n + 1)
        done = threading.Event()
        stops: list[float] = []
        t0 = time.perf_counter()

        def one() -> None:
            try:
                with SmolVM(data_dir=self.d) as vm:
                    vm.run("true")
                    firsts.append(time.perf_counter() - t0)
                    ready.wait(300)
                    done.wait(300)
                    rss.append(rss_of(vm.info.pid))
                    a = time.perf_counter()
                stops.append(time.perf_counter() - a)
            except Exception as exc:
                errors.append(repr(exc))
                try:
                    ready.abort()
                except threading.BrokenBarrierError:
                    pass

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        try:
            ready.wait(300)
        except threading.BrokenBarrierError:
            pass
        all_up = time.perf_counter() - t0
        time.sleep(2)
        done.set()
        for t in threads:
            t.join(300)
        return {
            "n": n,
            "all_ready_s": round(all_up, 3),
            "first_command_s": stats(firsts),
            "idle_rss_mib": stats([r.get("VmRSS", 0) / 1024 for r in rss], nd=1),
            "idle_pss_mib": stats([r.get("Pss", 0) / 1024 for r in rss], nd=1),
            "stop_delete_ms": stats(stops, 1000, 1),
            "errors": errors,
        }

    def report(self) -> dict:
        r = self.r
        out = {
            "restore": {
                "total_s": stats(r["restore_total"]),
                "first_command_s": stats(r["restore_first"]),
                "stop_delete_ms": stats(r["restore_stop"], 1000, 1),
            },
            "pool": {
                "handout_ms": stats(r["pool_handout"], 1000, 2),
                "handout_plus_first_command_ms": stats(r["pool_first"], 1000, 2),
                "stop_delete_ms": stats(r["pool_stop"], 1000, 1),
            },
            "cold_boot": {
                "first_command_s": stats(r["cold_first"]),
                "total_s": stats(r["cold_total"]),
                "stop_delete_ms": stats(r["cold_stop"], 1000, 1),
            },
            "snapshot_save_s": {
                "file_memory_from_cold_vm": stats(r["snapshot_file"]),
                "stream_memory_from_restored_vm": stats(r["snapshot_stream"]),
            },
            "warm_command_ms": {
                "login": stats(r["warm_login"], 1000, 2),
                "raw": stats(r["warm_raw"], 1000, 2),
            },
            "stop_delete_ms": stats(r["restore_stop"] + r["pool_stop"], 1000, 1),
            "idle_cpu_percent_of_core": {k: stats(v, nd=2) for k, v in self.idle_cpu.items()},
            "idle_rss_mib": {
                k: {
                    "VmRSS": stats([x.get("VmRSS", 0) / 1024 for x in v], nd=1),
                    "Pss": stats([x.get("Pss", 0) / 1024 for x in v], nd=1),
                }
                for k, v in self.rss.items()
            },
        }
        return out


def _delete_snapshot(data_dir: Path, name: str) -> None:
    from smolvm import SmolVMManager

    with SmolVMManager(data_dir=data_dir) as m:
        m.delete_snapshot(name)
