"""Peer side of benchmarks/run.py: Microsoft quicksand, run inside its own virtualenv.

    <peer-venv>/bin/python benchmarks/peer_quicksand.py round --warm 30 --idle 2
    <peer-venv>/bin/python benchmarks/peer_quicksand.py concurrent --n 8

Prints one JSON object. Times in seconds (measured in this process, like ours are
measured in-process). ``accel="tcg"``: quicksand's default picks KVM here and QEMU aborts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def rss_kib(pid: int) -> dict:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                out[line.split(":")[0]] = int(line.split()[1])
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def guest_mib(pid: int) -> int | None:
    """Guest RAM (MiB) from a QEMU process's ``-m`` argument (``512``, ``512M``, ``1G``,
    ``size=512M``)."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return None
    for i, a in enumerate(argv[:-1]):
        if a == b"-m":
            v = argv[i + 1].decode().split(",")[0].removeprefix("size=").upper()
            mult = 1024 if v.endswith("G") else 1
            try:
                return int(float(v.rstrip("MG")) * mult)
            except ValueError:
                return None
    return None


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d))
    return out


def sandbox_rss(sb) -> dict:
    """RSS of the sandbox's QEMU (a child of quicksand's reaper process), and of the
    helper processes around it (reaper, SMB server) for completeness."""
    reaper = sb._process_manager.pid
    kids = _children(reaper)
    qemu = [k for k in kids if open(f"/proc/{k}/comm").read().startswith("qemu")]
    res = rss_kib(qemu[0]) if qemu else {}
    if qemu:
        res["guest_mib"] = guest_mib(qemu[0])
    res["helpers_VmRSS"] = sum(rss_kib(p).get("VmRSS", 0) for p in [reaper, *kids] if p not in qemu)
    return res


async def one_round(warm: int, idle: float) -> dict:
    from quicksand import Sandbox

    t0 = time.perf_counter()
    sb = Sandbox(image="alpine", accel="tcg")
    await sb.start()
    r = await sb.execute("true")
    first = time.perf_counter() - t0
    assert r.exit_code == 0, r
    xs = []
    for _ in range(5):  # the same untimed warm-up as ours
        await sb.execute("true")
    for _ in range(warm):
        a = time.perf_counter()
        await sb.execute("true")
        xs.append(time.perf_counter() - a)
    await asyncio.sleep(idle)
    rss = sandbox_rss(sb)
    t1 = time.perf_counter()
    await sb.stop()
    stop = time.perf_counter() - t1
    return {
        "first_command_s": first,
        "warm_true_s": xs,
        "idle_rss_kib": rss,
        "stop_s": stop,
        "total_s": time.perf_counter() - t0,
    }


async def concurrent(n: int, idle: float, timeout: float = 420.0) -> dict:
    from quicksand import Sandbox

    t0 = time.perf_counter()
    boxes = [Sandbox(image="alpine", accel="tcg") for _ in range(n)]
    firsts: list[float] = []

    async def up(sb):
        await sb.start()
        r = await sb.execute("true")
        assert r.exit_code == 0, r
        firsts.append(time.perf_counter() - t0)

    try:
        # One guest that never comes up must not hold the others' result hostage.
        results = await asyncio.gather(
            *(asyncio.wait_for(up(b), timeout) for b in boxes), return_exceptions=True
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        all_up = time.perf_counter() - t0
        await asyncio.sleep(idle)
        rss = [sandbox_rss(b) for b in boxes if b.is_running]
    finally:
        t1 = time.perf_counter()
        await asyncio.gather(*(b.stop() for b in boxes), return_exceptions=True)
        stop = time.perf_counter() - t1
    return {
        "n": n,
        "first_command_s": firsts,
        "all_ready_s": all_up,
        "idle_rss_kib": rss,
        "stop_all_s": stop,
        "errors": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("round")
    r.add_argument("--warm", type=int, default=30)
    r.add_argument("--idle", type=float, default=2.0)
    c = sub.add_parser("concurrent")
    c.add_argument("--n", type=int, default=8)
    c.add_argument("--idle", type=float, default=2.0)
    c.add_argument("--timeout", type=float, default=420.0, help="per sandbox, seconds")
    a = ap.parse_args()
    if a.cmd == "round":
        res = asyncio.run(one_round(a.warm, a.idle))
    else:
        res = asyncio.run(concurrent(a.n, a.idle, a.timeout))
    json.dump(res, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
