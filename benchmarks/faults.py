"""Runaway commands and guest crashes: how long until the sandbox answers again.

    .venv/bin/python benchmarks/faults.py [--rounds 3] [--out results/faults-DATE.json]

Each fault runs in a fresh restored sandbox (the default image). "fault_call_s": how long
the faulting call took to return (8 s for the ones that run into their timeout=8);
"recover_s": from then until ``run("echo alive")`` in a new session returned. For a kernel
panic, "kernel_panic_to_error" is the time until the call under which the guest died
raised GuestCrashedError (the VM is then ERROR). Prints one JSON object (medians and
nearest-rank p95).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from stats import summary  # benchmarks/ is on sys.path as the script dir

FAULTS = {
    "fork_bomb": "f(){ f|f& }; f",
    "fork_bomb_spawner_loop": "while :; do (sleep 60 &); done",
    "fork_bomb_setsid": "setsid sh -c 'f(){ f|f& }; f' &",
    "fork_bomb_double_fork": "(sh -c 'g(){ g & g & }; g' &) &",
    "memory_hog": "python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'",
    "cpu_spinner_left_running": "spawn:while :; do :; done",
    "timeout_with_background_children": "sleep 301 & setsid sleep 302 & wait",
}


def stats(xs: list[float]) -> dict:
    return summary(xs)


def one_fault(data_dir: Path, command: str) -> tuple[float, float]:
    from smolvm import OperationTimeoutError, SmolVM

    with SmolVM(data_dir=data_dir) as vm:
        vm.run("true")
        t0 = time.perf_counter()
        if command.startswith("spawn:"):
            vm.spawn(command[len("spawn:") :], shell="raw")
        else:
            try:
                vm.run(command, shell="raw", timeout=8)
            except OperationTimeoutError:
                pass
        t1 = time.perf_counter()
        vm.run("echo alive", shell="raw", timeout=30)
        return t1 - t0, time.perf_counter() - t1


def panic(data_dir: Path) -> float:
    from smolvm import GuestCrashedError, SmolVM

    with SmolVM(data_dir=data_dir) as vm:
        vm.run("true")
        t0 = time.perf_counter()
        try:
            vm.run("echo c > /proc/sysrq-trigger; sleep 30", shell="raw", timeout=60)
        except GuestCrashedError:
            return time.perf_counter() - t0
    raise RuntimeError("the panic was not reported as GuestCrashedError")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    note = " ".join((__doc__ or "").split("\n\n")[2].split())
    res: dict = {"rounds": args.rounds, "fault_call_s": {}, "recover_s": {}, "note": note}
    with TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, cmd in FAULTS.items():
            runs = [one_fault(d, cmd) for _ in range(args.rounds)]
            res["fault_call_s"][name] = stats([r[0] for r in runs])
            res["recover_s"][name] = stats([r[1] for r in runs])
        res["recover_s"]["kernel_panic_to_error"] = stats([panic(d) for _ in range(args.rounds)])
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
