"""Lifetimes: an owned sandbox ends with its process (even SIGKILLed), a detached one does
not; a dead VMM is reported as ERROR; idle sandboxes pause or stop and wake on use."""

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

from smolvm import procs

OWNER = textwrap.dedent(
    """
    import json, sys, time
    from smolvm import SmolVM, WarmPool
    data_dir, mode = sys.argv[1], sys.argv[2]
    if mode == "pool":
        pool = WarmPool(size=1, data_dir=data_dir).start()
        assert pool.wait_ready(timeout=120)
        vm = SmolVM(pool=pool)
    else:
        vm = SmolVM(data_dir=data_dir, cold_boot=mode == "cold", detached=mode == "detached")
    if vm.status.value in ("created", "stopped"):
        vm.start()
    assert vm.run("echo up").output == "up"
    st = vm.manager.state
    print(json.dumps({"vm_id": vm.vm_id, "pid": st.get_vm(vm.vm_id).pid,
                      "watchdog": st.watchdog(st.get_vm(vm.vm_id).owner or "") or None}), flush=True)
    time.sleep(600)
    """
)


def start_owner(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], dict]:
    p = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(data_dir), mode], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"owner process failed (exit {p.wait()})"
    return p, json.loads(line)


def leftovers(data_dir: Path, socket_dir: Path, vm_id: str) -> dict[str, list[str]]:
    """Everything of ``vm_id`` still on the host: processes, files, sockets, rows."""
    out = subprocess.run(["pgrep", "-af", str(data_dir)], capture_output=True, text=True).stdout
    import sqlite3

    db = sqlite3.connect(data_dir / "state.db")
    try:
        rows = [r[0] for r in db.execute("SELECT vm_id FROM vms")]
        res = [f"{k}:{v}" for k, v in db.execute("SELECT kind, value FROM resources")]
        ports = [str(r[0]) for r in db.execute("SELECT port FROM ports")]
    finally:
        db.close()
    return {
        "processes": [ln for ln in out.splitlines() if "pgrep" not in ln],
        "rows": rows,
        "resources": res,
        "ports": ports,
        "disks": [p.name for p in (data_dir / "disks").iterdir()],
        "vm_dirs": [p.name for p in (data_dir / "vms").iterdir()],
        "sockets": [p.name for p in socket_dir.glob(f"smolvm-{vm_id}.*")],
        "shm": [p for p in os.listdir("/dev/shm") if vm_id in p],
    }


def wait_until(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["cold", "restored", "pool"])
def test_an_owned_sandbox_ends_with_its_sigkilled_process(data_dir: Path, default_image, mode: str) -> None:
    from smolvm.paths import default_socket_dir

    p, vm = start_owner(data_dir, mode)
    assert vm["watchdog"], "the owner's watchdog is recorded"
    qemu = int(vm["pid"])
    assert procs.is_alive(qemu)
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone_after = wait_until(lambda: not procs.is_alive(qemu), 10.0)  # the guarantee
    sock_dir = default_socket_dir(data_dir)
    wait_until(lambda: not procs.is_alive(int(vm["watchdog"].split(":")[0])), 30.0)
    left = leftovers(data_dir, sock_dir, vm["vm_id"])
    assert not any(left.values()), left  # no reconcile() was run
    print(json.dumps({"lifetime": mode, "vmm_gone_s": round(gone_after, 2)}))


@pytest.mark.e2e
def test_a_detached_sandbox_survives_its_process_and_reconnects(data_dir: Path, default_image) -> None:
    from smolvm import SmolVM, SmolVMManager

    p, vm = start_owner(data_dir, "detached")
    assert vm["watchdog"] is None  # nothing watches it
    p.kill()
    p.wait()
    time.sleep(0.5)  # a watchdog, had there been one, would be at work by now
    assert procs.is_alive(int(vm["pid"]))
    with SmolVM.from_id(vm["vm_id"], data_dir=data_dir) as again:
        assert again.run("echo still").output == "still"
    with SmolVMManager(data_dir=data_dir) as m:
        assert m.get(vm["vm_id"]).status.value == "stopped"  # from_id stops, never deletes
        m.delete(vm["vm_id"])


@pytest.mark.e2e
def test_reconcile_reaps_an_owner_whose_watchdog_died_too(data_dir: Path, default_image) -> None:
    from smolvm import SmolVMManager

    p, vm = start_owner(data_dir, "restored")
    os.kill(int(vm["watchdog"].split(":")[0]), signal.SIGKILL)  # the watchdog first...
    p.kill()  # ...then its owner: nobody is left to clean up
    p.wait()
    time.sleep(0.5)
    assert procs.is_alive(int(vm["pid"]))
    with SmolVMManager(data_dir=data_dir) as m:
        m.reconcile()
        assert not m.state.vm_exists(vm["vm_id"]) and m.state.owners() == []
    assert not procs.is_alive(int(vm["pid"]))


@pytest.mark.e2e
def test_a_vm_whose_vmm_died_is_error_never_running(vms) -> None:
    vm = vms.sandbox().start()
    pid = vms.manager.state.get_vm(vm.vm_id).pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_alive(pid), 5.0)
    info = vms.manager.get(vm.vm_id)
    assert info.status.value == "error"
    assert [v.status.value for v in vms.manager.list_vms() if v.vm_id == vm.vm_id] == ["error"]
    assert not vms.manager.state.resources(vm.vm_id, "helper")  # its console writer, uplink went too


@pytest.mark.e2e
def test_an_idle_sandbox_pauses_and_wakes_on_the_next_call(vms) -> None:
    vm = vms.sandbox(idle_timeout=1.0).start()
    h = vm.spawn("sleep 2.5")  # a running spawned process is use
    time.sleep(2.0)
    assert vm.refresh().status.value == "running"
    h.wait(timeout=10)
    wait_until(lambda: vm.refresh().status.value == "paused", 5.0)
    t0 = time.monotonic()
    assert vm.run("echo awake").output == "awake"  # resumed first
    assert vm.refresh().status.value == "running"
    print(json.dumps({"idle_wake_s": round(time.monotonic() - t0, 3)}))


@pytest.mark.e2e
def test_idle_action_stop_stops_and_the_next_call_starts(vms) -> None:
    from smolvm.exceptions import ValidationError

    with pytest.raises(ValidationError, match="idle_action"):
        vms.sandbox(idle_timeout=1.0, idle_action="hibernate")
    vm = vms.sandbox(idle_timeout=0.5, idle_action="stop", cold_boot=True).start()
    vm.run("echo kept > /root/f; sync")
    wait_until(lambda: vm.refresh().status.value == "stopped", 30.0)  # a graceful stop: <= 10 s
    assert vm.run("cat /root/f").output == "kept"  # started again: the disk stayed
