"""What a sandbox costs the host while it waits, and what SmolVM costs to start (P4, P6).

Idle CPU is read from /proc (utime + stime of every thread) of all of a sandbox's host
processes: QEMU and its helpers (slirp4netns, the console logger), found by the VM id in
their command lines. Start-up costs run in fresh interpreters, as users meet them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from stats import summary

CLK_TCK = os.sysconf("SC_CLK_TCK")


def sandbox_pids(*vm_ids: str) -> list[int]:
    """Host processes whose command line names one of ``vm_ids`` (QEMU, slirp4netns,
    multilog), found in one pass over /proc."""
    out = []
    needles = [v.encode() for v in vm_ids]
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if any(n in argv for n in needles):
            out.append(int(d))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (s) of every thread of ``pid`` so far (0 once it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime (threads included)


def idle_cpu_percent(pids: list[int], seconds: float) -> float:
    """Percent of one core the processes used together over ``seconds`` of wall time."""
    a = sum(cpu_seconds(p) for p in pids)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = sum(cpu_seconds(p) for p in pids)
    return 100.0 * (b - a) / (time.monotonic() - t0)


def pss_kib(pids: list[int]) -> int:
    """Sum of the processes' proportional set sizes (shared pages counted once overall)."""
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


_IMPORT = "import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"


def startup_costs(runs: int, data_dir: Path) -> dict:
    """P6: ``import smolvm`` and ``from smolvm import SmolVM`` in a fresh interpreter (time
    inside it, interpreter start excluded), and ``smolvm list`` as a whole process (wall
    time, interpreter start included), each ``runs`` times after one untimed run."""
    py = sys.executable
    env = {**os.environ, "SMOLVM_DATA_DIR": str(data_dir)}
    cli = Path(py).with_name("smolvm")
    res: dict[str, list[float]] = {"import_smolvm": [], "from_smolvm_import_SmolVM": [], "smolvm_list": []}
    stmts = {"import_smolvm": "import smolvm", "from_smolvm_import_SmolVM": "from smolvm import SmolVM"}
    for i in range(runs + 1):
        for key, stmt in stmts.items():
            argv = [py, "-c", _IMPORT.format(stmt=stmt)]
            p = subprocess.run(argv, capture_output=True, text=True, check=True)
            if i:
                res[key].append(float(p.stdout.strip()))
        t = time.perf_counter()
        subprocess.run([str(cli), "list"], capture_output=True, env=env, check=True)
        if i:
            res["smolvm_list"].append(time.perf_counter() - t)
    return {k: summary(v, 1000, 1) for k, v in res.items()}
