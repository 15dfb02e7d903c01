"""Core latency benchmark: cold boot → first command per channel, the default (snapshot
restored) sandbox, warm command round trip per channel, and image build time. Prints JSON
(medians and p95 over repeated runs).

    .venv/bin/python benchmarks/bench_core.py [--boots 5] [--warm 100] [--build]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from stats import summary  # benchmarks/ is on sys.path as the script dir


def stats(xs: list[float]) -> dict:
    return summary(xs)


def boot_to_first_command(channel: str, runs: int, data_dir: Path, **cfg) -> dict:
    from smolvm import SmolVM

    first, total = [], []
    with SmolVM(data_dir=data_dir, comm_channel=channel, **cfg) as vm:  # warm-up, not timed
        vm.run("true")  # (also creates the boot snapshot on first use)
    for _ in range(runs):
        t0 = time.perf_counter()
        with SmolVM(data_dir=data_dir, comm_channel=channel, **cfg) as vm:
            vm.run("true")
            first.append(time.perf_counter() - t0)
        total.append(time.perf_counter() - t0)
    return {"first_command_s": stats(first), "total_with_teardown_s": stats(total)}


def warm(channel: str, runs: int, data_dir: Path) -> dict:
    from smolvm import SmolVM

    out = {}
    with SmolVM(data_dir=data_dir, comm_channel=channel) as vm:
        for _ in range(5):
            vm.run("true")
        for shell in ("login", "raw"):
            xs = []
            for _ in range(runs):
                t0 = time.perf_counter()
                vm.run("true", shell=shell)
                xs.append(time.perf_counter() - t0)
            out[shell] = {
                k: (round(v * 1000, 2) if isinstance(v, float) else v) for k, v in stats(xs).items()
            }
    return {"true_ms": out}


def image_build(tmp: Path) -> dict:
    from smolvm.images import ImageBuilder

    b = ImageBuilder(tmp / "images")
    t0 = time.perf_counter()
    b.build_image("bench")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.build_image("bench", force=True)  # kernel + debootstrap cached: assembly only
    rebuild = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.build_image("bench")  # inputs unchanged: cache hit
    hit = time.perf_counter() - t0
    return {
        "cold_build_s": round(cold, 1),
        "rebuild_cached_base_s": round(rebuild, 1),
        "cache_hit_s": round(hit, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--warm", type=int, default=100)
    ap.add_argument("--build", action="store_true", help="also time a cold image build (~1-2 min)")
    args = ap.parse_args()
    from smolvm.images import ImageBuilder

    # Every temporary data dir below shares the machine's built image (no rebuild timed).
    art = ImageBuilder().ensure_default()
    os.environ["SMOLVM_IMAGE_DIR"] = str(art.path.parent)
    with tempfile.TemporaryDirectory(prefix="smolvm-bench-") as t:
        tmp = Path(t)
        res: dict = {"host": {"cpus": os.cpu_count()}}
        from smolvm.host.accel import accel_decision

        res["host"]["accelerator"] = accel_decision().accel
        for ch in ("agent", "ssh"):
            res[f"cold_boot_{ch}"] = boot_to_first_command(ch, args.boots, tmp / "d", cold_boot=True)
        # SmolVM() with the default config restores the image's boot snapshot.
        res["default_sandbox_agent"] = boot_to_first_command("agent", args.boots, tmp / "d")
        for ch in ("agent", "ssh"):
            res[f"warm_{ch}"] = warm(ch, args.warm, tmp / "d")
        if args.build:
            res["image_build"] = image_build(tmp)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
