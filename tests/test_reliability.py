"""Reliability suite (``-m reliability``; runs in CI). Prints one JSON line of figures
(``RELIABILITY {...}`` in the terminal summary):

* R1 faults: the SDK process SIGKILLed after every state-store write of a scenario (create,
  start cold and restored, run, upload, snapshot, pool fill, stop, delete; user and TAP
  network); then, without reconcile for owned sandboxes and after ``reconcile()`` for
  detached ones, everything left on the host is counted (must be 0).
* R2 load: 8 processes x 50 mixed operations on one data dir.
* R3 bad input (hypothesis) against one VM.
* R4 guest faults with a canary sandbox answering alongside.
* R5 host faults: a full filesystem under the data dir, a truncated state database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reliability_census import census, host_wide

FIGURES: dict[str, object] = {}
pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

# A scenario run in a child process; with KILL_AT=k it SIGKILLs itself right after the
# state store's k-th committed write (KILL_AT=0: run through and print the count).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from contextlib import contextmanager
    from pathlib import Path
    from smolvm import SmolVM, VMConfig, WarmPool
    from smolvm.state import store

    data_dir, scenario = Path(sys.argv[1]), sys.argv[2]
    kill_at, detached = int(sys.argv[3]), sys.argv[4] == "1"
    writes = 0
    real_tx = store.StateStore.tx

    def counting_tx(self):
        global writes
        with real_tx(self) as conn:
            yield conn
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store.StateStore.tx = contextmanager(counting_tx)
    payload = data_dir.parent / "payload.bin"
    payload.parent.mkdir(parents=True, exist_ok=True)
    payload.write_bytes(os.urandom(256 * 1024))
    if scenario == "pool":
        pool = WarmPool(size=1, data_dir=data_dir).start()
        assert pool.wait_ready(timeout=120)
        vm = SmolVM(pool=pool)
    elif scenario == "tap":
        vm = SmolVM(VMConfig(network="tap"), data_dir=data_dir, detached=detached)
    else:
        vm = SmolVM(data_dir=data_dir, cold_boot=scenario == "cold", detached=detached)
    if vm.status.value in ("created", "stopped"):
        vm.start()
    assert vm.run("echo up").output == "up"
    vm.upload_file(payload, "/root/payload.bin")
    if scenario == "restored":
        vm.snapshot("s1")
        vm.manager.delete_snapshot("s1")
    vm.stop()
    vm.delete()
    if scenario == "pool":
        pool.close()
    print(writes, flush=True)
    """
)


def run_child(
    data_dir: Path, scenario: str, kill_at: int, detached: bool = False
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), scenario, str(kill_at), "1" if detached else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )


def wait_watchdogs(timeout: float = 30.0) -> None:
    """Until no watchdog process is left (the child's finishes its cleanup and exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", "runtime/watchdog.py"], capture_output=True, text=True).stdout
        mine = [p for p in out.split() if int(p) != os.getpid()]
        if not [p for p in mine if _parent(int(p)) != os.getpid()]:
            return
        time.sleep(0.05)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


# (scenario, detached, how many kill points: None = every write)
R1_CASES = [
    ("restored", False, None),
    ("cold", False, 6),
    ("pool", False, 8),
    ("tap", False, 6),
    ("restored", True, 8),
]


@pytest.mark.requires("root")
def test_r1_sigkill_at_every_step_leaves_nothing(tmp_path: Path, default_image) -> None:
    from smolvm import SmolVMManager

    figures: dict[str, object] = {"kills": 0, "leaked": 0, "inconsistent": 0, "by_scenario": {}}
    for scenario, detached, sample in R1_CASES:
        probe = run_child(tmp_path / f"probe-{scenario}-{detached}" / "data", scenario, 0, detached)
        assert probe.returncode == 0, probe.stderr[-3000:]
        total = int(probe.stdout.split()[-1])
        points = list(range(1, total + 1))
        if sample is not None and sample < total:
            points = sorted({1 + round(i * (total - 1) / (sample - 1)) for i in range(sample)})
        leaked_here = 0
        for k in points:
            d = tmp_path / f"{scenario}-{int(detached)}-{k}" / "data"
            before = host_wide()
            r = run_child(d, scenario, k, detached)
            # A pool's refill thread writes a varying number of times: k may be past the end.
            assert r.returncode == -signal.SIGKILL or (r.returncode == 0 and scenario == "pool"), (
                k,
                r.returncode,
                r.stderr[-2000:],
            )
            if not (d / "state.db").exists():
                continue  # killed before the data dir had a database: nothing to look at
            wait_watchdogs()
            if detached:
                with SmolVMManager(data_dir=d) as m:
                    m.reconcile()
                    after_reconcile = census(d, before)
                    assert after_reconcile["inconsistent"] == 0, (scenario, k, after_reconcile)
                    figures["inconsistent"] = int(figures["inconsistent"]) + after_reconcile["inconsistent"]
                    for v in m.list_vms():  # what a detached run legitimately left: delete it
                        m.delete(v.vm_id)
            left = census(d, before)
            leaks = {k2: v for k2, v in left.items() if v}
            assert not leaks, (scenario, detached, k, total, leaks)
            leaked_here += sum(left.values())
            figures["kills"] = int(figures["kills"]) + 1
        figures["leaked"] = int(figures["leaked"]) + leaked_here
        figures["by_scenario"][f"{scenario}{'-detached' if detached else ''}"] = {  # type: ignore[index]
            "writes": total,
            "kill_points": len(points),
        }
    FIGURES["R1"] = figures


# ---------------------------------------------------------------- R2 load
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from smolvm import SmolVM, SmolVMManager, VMConfig
    data_dir, n, tap = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    payload = Path(sys.argv[4])
    ops, errors, seen, dup_lists = 0, [], [], 0
    mgr = SmolVMManager(data_dir=data_dir)
    while ops < n:
        try:
            vm = SmolVM(VMConfig(network="tap") if tap else None, manager=mgr)
            vm.start(); ops += 1
            net = vm.info.network
            t0 = time.time()
            assert vm.run("echo $((6*7))").output == "42"; ops += 1
            vm.upload_file(payload, "/root/p.bin"); ops += 1
            ids = [v.vm_id for v in mgr.list_vms()]; ops += 1
            dup_lists += len(ids) != len(set(ids))
            vm.delete(); ops += 1
            seen.append([vm.vm_id, net.ssh_host_port, net.guest_ip if tap else None,
                         net.tap_device if tap else None, t0, time.time()])
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300]); ops += 1
    print(json.dumps({"ops": ops, "errors": errors, "seen": seen, "dup_lists": dup_lists}), flush=True)
    """
)


def _overlaps(seen: list[list], col: int) -> int:
    """Pairs of VMs alive at the same time with the same value in column ``col``."""
    n = 0
    rows = [r for r in seen if r[col] is not None]
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a[col] == b[col] and a[4] < b[5] and b[4] < a[5]:
                n += 1
    return n


@pytest.mark.requires("root")
def test_r2_eight_processes_fifty_operations_each(tmp_path: Path, default_image) -> None:
    from smolvm import SmolVMManager

    data_dir = tmp_path / "data"
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(64 * 1024))
    with SmolVMManager(data_dir=data_dir):
        pass  # create the store once
    t0 = time.monotonic()
    procs_ = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(data_dir), "50", "1" if i < 2 else "0", str(payload)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    results = []
    for p in procs_:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.monotonic() - t0
    seen = [s for r in results for s in r["seen"]]
    errors = [e for r in results for e in r["errors"]]
    ids = [s[0] for s in seen]
    figures = {
        "processes": 8,
        "operations": sum(r["ops"] for r in results),
        "ops_per_s": round(sum(r["ops"] for r in results) / wall, 2),
        "wall_s": round(wall, 1),
        "vms": len(seen),
        "vm_id_collisions": len(ids) - len(set(ids)),
        "port_collisions": _overlaps(seen, 1),
        "ip_collisions": _overlaps(seen, 2),
        "tap_collisions": _overlaps(seen, 3),
        "duplicated_rows_in_lists": sum(r["dup_lists"] for r in results),
        "database_locked": sum("locked" in e for e in errors),
        "failed_operations": len(errors),
    }
    with SmolVMManager(data_dir=data_dir) as m:
        figures["rows_left"] = len(m.list_vms())  # every worker deleted what it made
    FIGURES["R2"] = figures
    assert errors == [], errors[:5]
    for k in ("vm_id_collisions", "port_collisions", "ip_collisions", "tap_collisions"):
        assert figures[k] == 0, figures
    assert figures["duplicated_rows_in_lists"] == 0 and figures["rows_left"] == 0, figures


# ---------------------------------------------------------------- R3 bad input
class Planted(Exception):
    """Raised by the test's own callbacks: it is theirs to propagate."""


def test_r3_bad_input_only_ever_raises_typed_errors(shared_vm, tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from smolvm import Callback, SmolVM, SmolVMManager, VMConfig
    from smolvm.exceptions import SmolVMError

    foreign: list[str] = []
    calls = {"n": 0}

    def attempt(fn) -> None:
        calls["n"] += 1
        try:
            fn()
        except (SmolVMError, Planted):
            pass
        except Exception as exc:
            foreign.append(f"{type(exc).__name__}: {exc}"[:200])

    mgr: SmolVMManager = shared_vm.manager
    text = st.text(st.characters(codec="utf-8"), max_size=300)
    weird = st.one_of(text, st.sampled_from(["../../etc/passwd", "a/b", ".", "", "x" * 5000, "é-ü", "a\0b"]))
    cfg_values = st.one_of(st.none(), st.integers(-(2**40), 2**40), text, st.floats(), st.booleans())

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(vm_id=weird)
    def ids(vm_id: str) -> None:
        attempt(lambda: mgr.get(vm_id))
        attempt(lambda: SmolVM.from_id(vm_id, data_dir=mgr.data_dir).close())
        attempt(lambda: VMConfig(vm_id=vm_id))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        field=st.sampled_from(
            [
                "vcpu_count",
                "mem_size_mib",
                "disk_size_mib",
                "network",
                "boot_args",
                "kernel_path",
                "port_forwards",
                "env_vars",
                "comm_channel",
            ]
        ),
        value=cfg_values,
    )
    def configs(field: str, value: object) -> None:
        attempt(lambda: VMConfig(**{field: value}))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(env=st.dictionaries(weird, weird, max_size=3), cwd=st.one_of(st.none(), weird), cmd=weird)
    def runs(env: dict[str, str], cwd: str | None, cmd: str) -> None:
        attempt(lambda: shared_vm.run(cmd, env=env, cwd=cwd, timeout=10))

    ids()
    configs()
    runs()

    # A 1 MB command, NUL bytes, binary output, stdin of every byte.
    attempt(lambda: shared_vm.run("echo " + "a" * 1_000_000, timeout=30))
    attempt(lambda: shared_vm.run("printf 'a\\0b'\0; echo", timeout=10))
    attempt(lambda: shared_vm.run("head -c 4096 /dev/urandom", timeout=10))  # binary output
    attempt(lambda: shared_vm.run("cat > /dev/null", stdin=bytes(range(256)) * 100, timeout=10))

    # Callbacks that raise: a pre-run veto propagates as itself; observers are swallowed.
    class Raising(Callback):
        def on_pre_run(self, ctx):
            raise Planted("veto")

    class BrokenObserver(Callback):
        def on_post_run(self, ctx):
            raise RuntimeError("observer bug")

    observed = SmolVM.from_id(shared_vm.vm_id, data_dir=mgr.data_dir, callbacks=[BrokenObserver()])
    assert observed.run("echo observed").output == "observed"
    observed.close()
    vetoed = SmolVM.from_id(shared_vm.vm_id, data_dir=mgr.data_dir, callbacks=[Raising()])
    with pytest.raises(Planted):
        vetoed.run("echo never")
    vetoed.close()

    # An output callback that hangs: the call still ends within its timeout + 2 s.
    t0 = time.monotonic()
    attempt(lambda: shared_vm.run("echo a; sleep 30", timeout=2, on_stdout=lambda b: time.sleep(3)))
    hang_s = time.monotonic() - t0

    assert shared_vm.run("echo still-answers").output == "still-answers"
    FIGURES["R3"] = {
        "calls": calls["n"],
        "foreign_exceptions": len(foreign),
        "hanging_callback_s": round(hang_s, 2),
    }
    assert foreign == [], foreign[:5]
    assert hang_s < 2 + 2 + 1, hang_s


# ---------------------------------------------------------------- R4 guest faults
FILL_DISK = (
    "python3 -c \"import os; st = os.statvfs('/root'); fd = os.open('/root/fill', os.O_CREAT | os.O_WRONLY); "
    'os.posix_fallocate(fd, 0, st.f_bfree * st.f_frsize)"; echo more >> /root/more || echo ENOSPC'
)
GUEST_FAULTS = [
    # (name, command, timeout s, the VM survives)
    ("agent-kill", "kill -9 1; kill -SEGV 1; echo pid1-immune", 10, True),
    ("fork-bomb", "b() { b | b & }; b; sleep 30", 5, True),  # bombs on until the timeout
    ("guest-oom", "python3 -c 'b = []\nwhile True: b.append(bytearray(32 << 20))'", 30, True),
    ("disk-full", FILL_DISK, 30, True),
    ("output-flood", "yes flood", 3, True),
    ("kernel-panic", "echo c > /proc/sysrq-trigger", 10, False),
]


def test_r4_guest_faults_end_every_call_in_time(vms) -> None:
    import threading

    from smolvm.exceptions import SmolVMError

    canary = vms.sandbox().start()
    lat: list[float] = []
    canary_errors: list[str] = []
    stop = threading.Event()

    def ping() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                canary.run("true", timeout=10)
            except SmolVMError as exc:
                canary_errors.append(str(exc)[:200])
            lat.append(time.monotonic() - t0)
            time.sleep(0.05)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    outcomes = {}
    try:
        for name, cmd, timeout, survives in GUEST_FAULTS:
            vm = vms.sandbox().start()
            t0 = time.monotonic()
            try:
                r = vm.run(cmd, timeout=timeout)
                outcome = f"exit {r.exit_code}"
                assert name != "disk-full" or "ENOSPC" in r.output, r  # the disk really filled
            except SmolVMError as exc:
                outcome = type(exc).__name__
            took = time.monotonic() - t0
            status = vm.refresh().status.value
            outcomes[name] = {"outcome": outcome, "s": round(took, 2), "status": status}
            assert took < timeout + 2, (name, took, outcome)
            if survives:
                assert status == "running", (name, status)
                assert vm.run("echo ok", timeout=30).output == "ok", name
            else:
                assert status == "error" and outcome == "GuestCrashedError", (name, status, outcome)
            vm.delete()
    finally:
        stop.set()
        pinger.join(timeout=30)
    lat.sort()
    FIGURES["R4"] = {
        "faults": outcomes,
        "canary_calls": len(lat),
        "canary_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
        "canary_max_s": round(lat[-1], 3),
        "canary_errors": len(canary_errors),
    }
    assert canary_errors == [] and lat[-1] < 5.0, FIGURES["R4"]


# ---------------------------------------------------------------- R5 host faults
def run_doctor(data: Path) -> subprocess.CompletedProcess[str]:
    """``smolvm doctor`` for data dir ``data``."""
    return subprocess.run(
        [sys.executable, "-m", "smolvm.cli.main", "doctor"],
        env={**os.environ, "SMOLVM_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
    )


@pytest.mark.requires("root")
def test_r5_full_filesystem_and_truncated_database(tmp_path: Path, default_image) -> None:
    from smolvm import SmolVM, SmolVMManager, VMConfig
    from smolvm.exceptions import SmolVMError, StateError

    figures: dict[str, object] = {}
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        data = mnt / "data"
        with SmolVMManager(data_dir=data) as m:
            m.state.insert_vm("keep", status="stopped", backend="qemu", config=VMConfig(vm_id="keep"))
        with open(mnt / "fill", "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with pytest.raises(SmolVMError) as e:
            with SmolVM(data_dir=data) as vm:
                vm.run("true")
        figures["full_fs_error"] = type(e.value).__name__
        assert "full" in str(e.value), e.value
        doctor = run_doctor(data)
        assert "0 B free" in doctor.stdout and "is full" in doctor.stdout, doctor.stdout[-2000:]
        (mnt / "fill").unlink()
        with SmolVMManager(data_dir=data) as m:  # nothing was corrupted
            assert [v.vm_id for v in m.list_vms()] == ["keep"] and m.state.integrity_check() == "ok"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

    data = tmp_path / "trunc"
    with SmolVMManager(data_dir=data) as m:
        for i in range(40):
            m.state.insert_vm(f"x{i}", status="stopped", backend="qemu", config=VMConfig(vm_id=f"x{i}"))
    db = data / "state.db"
    os.truncate(db, db.stat().st_size // 2)
    with pytest.raises(StateError) as e2:
        with SmolVMManager(data_dir=data) as m:
            m.list_vms()
            m.state.integrity_check()
    figures["truncated_db_error"] = type(e2.value).__name__
    doctor = run_doctor(data)
    assert "state-db" in doctor.stdout and "malformed" in doctor.stdout, doctor.stdout[-2000:]
    FIGURES["R5"] = figures
