"""SmolVM vs Microsoft quicksand, measured interleaved in one run on this machine.

    .venv/bin/python benchmarks/run.py --quick        # 4-10 min (quicksand boots are slow)
    .venv/bin/python benchmarks/run.py                # 4 rounds, ~10-15 min
    .venv/bin/python benchmarks/run.py --no-peer      # ours only
    .venv/bin/python benchmarks/run.py --density 50   # P5: 50 running, then 200 paused

Operations (ours):
  restore       ``with SmolVM() as vm: vm.run("true")`` end to end (the image's boot
                snapshot is restored); also time to first command and stop+delete
  pool          ``SmolVM(pool=WarmPool(size=2))``: hand-out (constructor returns a running,
                re-identified sandbox), hand-out + first command
  cold_boot     ``SmolVM(cold_boot=True)`` to first command, and a snapshot of it
  warm_command  ``vm.run("true")`` on a running sandbox (login shell, and raw)
  stop_delete   ``with`` exit of an owned sandbox (kill, remove disk/sockets/state)
  idle_rss      VmRSS and PSS of a sandbox's QEMU after 2 s idle (restored, pooled, cold)
  idle_cpu      percent of a core an idle sandbox's host processes use (P4)
  concurrent    N sandboxes started at once (threads) until all ran a command
  startup       ``import smolvm`` / ``from smolvm import SmolVM`` in fresh interpreters and
                ``smolvm list`` as a process (P6)
and the same for quicksand (``accel="tcg"``; it has no memory snapshots or pools, so its
sandbox-ready time is a cold start). Peer rounds run in the peer's own virtualenv, in a
subprocess, between our rounds: every comparison (cold starts, warm commands) is
interleaved per round, concurrency runs ours / theirs / ours; both sides get the same
untimed warm-up. Output: JSON with medians, nearest-rank p95, the guest RAM of each side,
what each operation's "ready" includes ("definitions") and our/peer ratios, each naming
what it compares and whether it is like-for-like or a headline (our fastest path vs the
peer's only one). ``wave2_targets`` checks P1-P6 (benchmarks/targets.py), each with its
value, the target and ``ok``; P5 comes from the ``--density N`` mode (benchmarks/density.py).

The peer is installed on first use: ``python3 -m venv <dir> && <dir>/bin/pip install
'quick-sandbox[alpine]'`` (``--peer-venv``, default ``~/.cache/smolvm-bench/quicksand-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from density import density  # benchmarks/ is on sys.path as the script dir
from hostcost import startup_costs
from ours import Ours, log
from peer import Peer
from stats import ratio
from targets import check

DEFAULT_PEER_VENV = Path.home() / ".cache" / "smolvm-bench" / "quicksand-venv"
#: Wave 1 targets, still checked (absolute, this machine).
TARGETS = {
    "restore_total_median_s": 0.5,
    "pool_handout_median_ms": 20.0,
    "idle_rss_mib": 160.0,
    "stop_delete_median_ms": 300.0,
}


# ----------------------------------------------------------------------------- main

#: What each of our operations' "ready" includes (the JSON carries this).
DEFINITIONS = {
    "restore": "SmolVM() + start() + run('true') returned: a clone of the image's boot snapshot "
    "with its own disk overlay, sockets and ports, and its clock, entropy, hostname and env set "
    "through the agent before start() returns. Its new SSH host key and SSH server restart "
    "follow in the background ~1 s later at low priority (sandboxes with "
    "comm_channel='ssh' wait for them); total_s adds the with-exit (stop + delete).",
    "pool_handout": "SmolVM(pool=...) returned a running, re-identified sandbox (resume, clock, "
    "entropy); the pool restored and paused it earlier, off the timed path.",
    "cold_boot": "SmolVM(cold_boot=True) + start() + run('true'): kernel boot, init, agent ready.",
    "peer_first_command": "quicksand Sandbox(image='alpine', accel='tcg').start() + execute('true'): "
    "its only path (no memory snapshots or pools).",
    "warm_command": "run('true') on a running sandbox after 5 untimed commands (both sides); "
    "interleaved per round with the peer's.",
    "idle_rss": "VmRSS/Pss of the sandbox's QEMU after 2 s idle; guest RAM sizes in guest_mib.",
    "stop_delete": "ours: with-exit of an owned sandbox (kill QEMU, remove disk/sockets/state); "
    "peer: Sandbox.stop().",
}


def ratios(o: dict, p: dict, conc: dict) -> dict:
    """peer / ours for each comparison, with what it compares (headline ones compare our
    fastest path with the peer's only one; like-for-like ones the same operation)."""
    pm = p["first_command_s"].get("median")

    def r(value: float | None, compares: str, kind: str) -> dict:
        return {"value": value, "compares": compares, "kind": kind}

    out = {
        "with_run_true_end_to_end_vs_peer_cold": r(
            ratio(pm, o["restore"]["total_s"].get("median")),
            "our restore incl. run('true') and with-exit vs the peer's cold start to first command",
            "headline",
        ),
        "sandbox_ready_restore_vs_peer_cold": r(
            ratio(pm, o["restore"]["first_command_s"].get("median")),
            "our restore to first command vs the peer's cold start to first command (its best path)",
            "headline",
        ),
        "pool_handout_vs_peer_cold": r(
            ratio(pm, (o["pool"]["handout_ms"].get("median") or 0) / 1000),
            "different operations: our hand-out of a pre-restored sandbox vs the peer's cold start",
            "headline",
        ),
        "pool_handout_plus_command_vs_peer_cold": r(
            ratio(pm, (o["pool"]["handout_plus_first_command_ms"].get("median") or 0) / 1000),
            "different operations: hand-out + run('true') vs the peer's cold start + execute",
            "headline",
        ),
        "cold_boot_vs_peer_cold": r(
            ratio(pm, o["cold_boot"]["first_command_s"].get("median")),
            "like for like: our cold boot vs theirs, each to its first command",
            "like-for-like",
        ),
        "warm_command": r(
            ratio(p["warm_command_ms"].get("median"), o["warm_command_ms"]["login"].get("median")),
            "like for like: run('true') (login shell) vs execute('true'), warm",
            "like-for-like",
        ),
        "warm_command_raw": r(
            ratio(p["warm_command_ms"].get("median"), o["warm_command_ms"]["raw"].get("median")),
            "run('true', shell='raw') vs execute('true'), warm",
            "like-for-like",
        ),
        "stop_delete": r(
            ratio(p["stop_ms"].get("median"), o["stop_delete_ms"].get("median")),
            "different operations: our kill + delete vs the peer's stop()",
            "headline",
        ),
        "idle_rss_restored_vs_peer_cold": r(
            ratio(
                p["idle_rss_mib"]["VmRSS"].get("median"), o["idle_rss_mib"]["restored"]["VmRSS"].get("median")
            ),
            f"our restored sandbox ({o.get('guest_mib')} MiB guest) vs the peer's cold-booted one "
            f"({p.get('guest_mib')} MiB guest)",
            "headline",
        ),
        "idle_rss_cold_vs_peer_cold": r(
            ratio(p["idle_rss_mib"]["VmRSS"].get("median"), o["idle_rss_mib"]["cold"]["VmRSS"].get("median")),
            f"like for like: cold-booted sandboxes ({o.get('guest_mib')} vs {p.get('guest_mib')} MiB guest)",
            "like-for-like",
        ),
    }
    if "concurrent" in p:
        pc = p["concurrent"]
        # If some peer sandboxes never came up, compare with the last one that did.
        peer_ready = pc["first_command_s"].get("max") if pc["errors"] else pc["all_ready_s"]
        ours_ready = statistics.mean(conc["all_ready_s_runs"])
        out["concurrent_all_ready"] = r(
            ratio(peer_ready, ours_ready),
            f"{conc['n']} sandboxes started at once until all ran a command: ours restored (mean of "
            "the runs before and after the peer's), theirs cold; peer failures in "
            "concurrent_peer_failures",
            "headline",
        )
        out["concurrent_peer_failures"] = len(pc["errors"])
    return out


def host_info() -> dict:
    from smolvm.host.accel import accel_decision

    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    probe = accel_decision()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu.splitlines()[0] if qemu else None,
        "accelerator": probe.accel,
        "accelerator_reason": probe.reason,
        "loadavg_start": os.getloadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (~5 min)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 2 quick, 4 full)")
    ap.add_argument("--per-round", type=int, help="restores and hand-outs per round (5 quick, 10 full)")
    ap.add_argument("--warm", type=int, help="warm commands (30 quick, 200 full)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument(
        "--peer-venv", type=Path, default=Path(os.environ.get("SMOLVM_BENCH_PEER_VENV", DEFAULT_PEER_VENV))
    )
    ap.add_argument("--peer-timeout", type=float, default=900.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="P4: idle CPU window per sandbox")
    ap.add_argument("--startup-runs", type=int, default=15, help="P6: fresh interpreters per measure")
    ap.add_argument(
        "--density", type=int, metavar="N", help="P5 only: N running sandboxes, then --paused paused ones"
    )
    ap.add_argument("--paused", type=int, default=200, help="with --density: paused sandboxes (200)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 4)
    per = a.per_round or (5 if a.quick else 10)
    warm = a.warm or (30 if a.quick else 200)

    from smolvm.paths import resolve_data_dir, resolve_image_dir
    from smolvm.pools import WarmPool

    # Private data dirs, but the machine's usual image (and its boot snapshot) — not a rebuild.
    os.environ.setdefault("SMOLVM_IMAGE_DIR", str(resolve_image_dir(resolve_data_dir())))
    if a.density:
        return _density_only(a)
    peer = None
    if not a.no_peer:
        Peer.ensure(a.peer_venv)
        peer = Peer(a.peer_venv, a.peer_timeout)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="smolvm-bench-") as tmp:
        ours = Ours(Path(tmp) / "data", idle_s=a.idle_seconds)
        ours.prepare()
        res: dict = {
            "host": host_info(),
            "params": {
                "rounds": rounds,
                "per_round": per,
                "warm": warm,
                "concurrency": a.concurrency,
                "peer": not a.no_peer,
            },
        }
        if peer:
            log("quicksand: warm-up round (untimed, like ours)")
            peer.round(warm=5, timed=False)
        warm_per_round = max(10, warm // rounds)
        for rnd in range(rounds):
            log(f"round {rnd + 1}/{rounds}: ours cold boot + snapshot")
            ours.cold_round(snapshot=(rnd == 0))
            log(f"round {rnd + 1}/{rounds}: ours {per} restores")
            for i in range(per):
                ours.restore_round(measure_rss=(i == 0))
            ours.stream_snapshot_round()
            log(f"round {rnd + 1}/{rounds}: ours {per} pool hand-outs")
            pool = WarmPool(size=2, data_dir=ours.d)
            try:
                for i in range(per):
                    ours.pool_round(pool, measure_rss=(i == 0))
            finally:
                pool.close()
            log(f"round {rnd + 1}/{rounds}: ours {warm_per_round} warm commands")
            ours.warm(warm_per_round)
            if peer:
                log(f"round {rnd + 1}/{rounds}: quicksand cold start + {warm_per_round} warm commands")
                peer.round(warm=warm_per_round)
        log(f"ours: {a.concurrency} concurrent sandboxes")
        conc_runs = [ours.concurrent(a.concurrency)]
        if peer:
            # ours, theirs, ours: host drift during the peer's minutes hits both sides.
            log(f"quicksand: {a.concurrency} concurrent sandboxes (minutes under TCG)")
            peer.concurrent(a.concurrency)
            log(f"ours: {a.concurrency} concurrent sandboxes again")
            conc_runs.append(ours.concurrent(a.concurrency))
        conc = conc_runs[0]
        conc["all_ready_s_runs"] = [c["all_ready_s"] for c in conc_runs]
        conc["errors"] = [e for c in conc_runs for e in c["errors"]]
        o = ours.report()
        o["concurrent"] = conc
        o["guest_mib"] = ours.guest_mib
        res["ours"] = o
        res["definitions"] = DEFINITIONS
        if peer:
            p = peer.report()
            res["peer"] = {"name": "quicksand 0.13 (quick-sandbox[alpine], accel='tcg')", **p}
            res["ratios_peer_over_ours"] = ratios(o, p, conc)
        rss_worst = max((o["idle_rss_mib"][k]["VmRSS"].get("median") or 0) for k in ("restored", "pooled"))
        checks = {
            "restore_total_median_s": (
                o["restore"]["total_s"].get("median"),
                TARGETS["restore_total_median_s"],
            ),
            "pool_handout_median_ms": (
                o["pool"]["handout_ms"].get("median"),
                TARGETS["pool_handout_median_ms"],
            ),
            "idle_rss_mib": (rss_worst, TARGETS["idle_rss_mib"]),
            "stop_delete_median_ms": (o["stop_delete_ms"].get("median"), TARGETS["stop_delete_median_ms"]),
        }
        res["targets"] = {
            k: {"value": v, "target": t, "ok": v is not None and v <= t} for k, (v, t) in checks.items()
        }
        res["targets"]["concurrent_ok"] = {
            "value": a.concurrency - len(conc["errors"]),
            "target": a.concurrency,
            "ok": not conc["errors"],
        }
        log(f"startup costs: {a.startup_runs} fresh interpreters each")
        res["startup_ms"] = startup_costs(a.startup_runs, ours.d)
        res["wave2_targets"] = check(res)
        res["host"]["loadavg_end"] = os.getloadavg()
        res["wall_s"] = round(time.time() - t_start, 1)
    return _emit(res, a.out)


def _emit(res: dict, out: Path | None) -> int:
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 0


def _density_only(a: argparse.Namespace) -> int:
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="smolvm-density-") as tmp:
        res: dict = {"host": host_info(), "params": {"density": a.density, "paused": a.paused}}
        res["density"] = density(Path(tmp) / "data", a.density, a.paused)
        res["wave2_targets"] = check(res)
        res["host"]["loadavg_end"] = os.getloadavg()
        res["wall_s"] = round(time.time() - t_start, 1)
    return _emit(res, a.out)


if __name__ == "__main__":
    sys.exit(main())
