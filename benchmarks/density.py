"""P5: how many sandboxes one small host holds (``run.py --density N``).

1. Start N sandboxes (``SmolVM()`` restores, a few at a time) and keep them all running.
2. While all N are up: every sandbox runs ``run("true")`` at the same moment, ``rounds``
   times (worst case: N commands contend for the host's cores), then one sandbox after the
   other (what a single caller sees while N-1 others idle). p95 of both, against 1 s.
3. The host's idle cost of the N: CPU of all their processes over 10 s, MemAvailable drop,
   summed PSS.
4. Pause the N and start more, each paused once it answered, until ``paused`` sandboxes
   are paused; host memory again; then a sample of them is resumed and answers a command
   (paused sandboxes that cannot come back would not count).
"""

from __future__ import annotations

import random
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostcost import idle_cpu_percent, pss_kib, sandbox_pids
from ours import log
from stats import summary

P5_RUN_P95_S = 1.0


def mem_available_mib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _start(data_dir: Path, pause: bool):
    from smolvm import SmolVM

    vm = SmolVM(data_dir=data_dir)
    vm.start()
    vm.run("true")
    if pause:
        vm.pause()
    return vm


def _host_cost(vms: list, seconds: float) -> dict:
    pids = sandbox_pids(*(vm.vm_id for vm in vms))
    cpu = idle_cpu_percent(pids, seconds)
    return {
        "processes": len(pids),
        "cpu_percent_of_core_all": round(cpu, 2),
        "cpu_percent_of_core_per_sandbox": round(cpu / max(len(vms), 1), 3),
        "pss_mib_all": round(pss_kib(pids) / 1024, 1),
    }


def density(data_dir: Path, running: int, paused: int, rounds: int = 3, workers: int = 4) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~10 fds per sandbox
    _start(data_dir, pause=False).__exit__(None, None, None)  # untimed: image snapshot ready
    base_mib = mem_available_mib()
    vms: list = []
    out: dict = {"running": running, "paused_target": paused}
    out["host_mem_available_mib_before"] = round(base_mib)
    try:
        log(f"density: starting {running} sandboxes ({workers} at a time)")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            vms = list(ex.map(lambda _: _start(data_dir, False), range(running)))
        out["start_all_s"] = round(time.perf_counter() - t0, 2)
        time.sleep(3)  # settle: background identity work of the last ones
        out["idle_running"] = _host_cost(vms, 10.0)
        out["idle_running"]["host_mem_used_mib"] = round(base_mib - mem_available_mib())

        log(f"density: {rounds} rounds of {running} concurrent run('true'), then one by one")
        burst: list[float] = []
        for _ in range(rounds):
            gate = threading.Barrier(running)

            def one(vm, gate: threading.Barrier = gate) -> float:
                gate.wait(60)
                a = time.perf_counter()
                vm.run("true")
                return time.perf_counter() - a

            with ThreadPoolExecutor(running) as ex:
                burst += list(ex.map(one, vms))
        sweep = []
        for vm in vms:
            a = time.perf_counter()
            vm.run("true")
            sweep.append(time.perf_counter() - a)
        out["run_true_all_at_once_s"] = summary(burst)
        out["run_true_one_by_one_s"] = summary(sweep)

        log(f"density: pausing them and starting more until {paused} are paused")
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda vm: vm.pause(), vms))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            vms += list(ex.map(lambda _: _start(data_dir, True), range(max(0, paused - running))))
        out["start_and_pause_more_s"] = round(time.perf_counter() - t0, 2)
        out["paused"] = len(vms)
        pids = sandbox_pids(*(vm.vm_id for vm in vms))
        out["paused_host"] = {
            "processes": len(pids),
            "pss_mib_all": round(pss_kib(pids) / 1024, 1),
            "host_mem_used_mib": round(base_mib - mem_available_mib()),
            "host_mem_available_mib": round(mem_available_mib()),
        }
        sample = random.Random(0).sample(vms, min(10, len(vms)))
        back = []
        for vm in sample:
            a = time.perf_counter()
            vm.resume()
            vm.run("true")
            back.append(time.perf_counter() - a)
        out["resume_and_run_true_sample_s"] = summary(back)
    finally:
        log(f"density: deleting {len(vms)} sandboxes")
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda vm: vm.__exit__(None, None, None), vms))
    p95 = max(out["run_true_all_at_once_s"]["p95"], out["run_true_one_by_one_s"]["p95"])
    out["target"] = {
        "P5": {
            "value": {"running": running, "run_true_p95_s": p95, "paused": out["paused"]},
            "target": f">= 50 running with run('true') p95 < {P5_RUN_P95_S} s; >= 200 paused",
            "ok": running >= 50 and p95 < P5_RUN_P95_S and out["paused"] >= 200,
        }
    }
    return out
