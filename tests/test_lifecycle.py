"""Lifecycle of real QEMU guests through SmolVMManager and the SmolVM facade."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import qemu_pids_for
from smolvm import SmolVM, SmolVMError, VMConfig, VMNotFoundError, VMState, procs
from smolvm.exceptions import InvalidStateError, VMAlreadyExistsError

pytestmark = pytest.mark.e2e


def _leftovers(mgr, vm_id: str, info) -> dict:
    spec_dir = mgr.vm_dir(vm_id)
    return {
        "process": qemu_pids_for(vm_id),
        "disk": Path(info.disk_path).exists(),
        "vm_dir": spec_dir.exists(),
        "sockets": [p for p in mgr.socket_dir.glob(f"smolvm-{vm_id}.*")],
        "row": mgr.state.vm_exists(vm_id),
        "ports": mgr.state.ports(vm_id),
        "resources": mgr.state.resources(vm_id),
    }


def test_manager_lifecycle_transitions(vms):
    mgr = vms.manager
    vm_id = vms.track("life-1")
    info = mgr.create(VMConfig(vm_id=vm_id))
    assert info.status is VMState.CREATED
    assert Path(info.disk_path).exists() and info.pid is None
    assert info.network.ssh_host_port and info.network.mode == "user"
    kinds = {r["kind"] for r in mgr.state.resources(vm_id)}
    assert {"dir", "disk", "port"} <= kinds

    with pytest.raises(VMAlreadyExistsError):
        mgr.create(VMConfig(vm_id=vm_id))

    info = mgr.start(vm_id)
    assert info.status is VMState.RUNNING
    assert procs.is_alive(info.pid)
    assert info.accelerator in ("kvm", "tcg") and info.accelerator_reason
    assert mgr.list_vms(status=VMState.RUNNING)[0].vm_id == vm_id
    with pytest.raises(InvalidStateError):
        mgr.start(vm_id)  # already running
    assert isinstance(InvalidStateError("x"), SmolVMError)

    vm = SmolVM.from_id(vm_id, data_dir=vms.data_dir)
    vm.run("echo persisted > /root/marker && sync")
    vm.close()

    pid = info.pid
    info = mgr.stop(vm_id, timeout=10)
    assert info.status is VMState.STOPPED and info.pid is None
    assert not procs.is_alive(pid)
    assert not list(mgr.socket_dir.glob(f"smolvm-{vm_id}.*"))
    assert mgr.stop(vm_id).status is VMState.STOPPED  # stopping a stopped VM is a no-op

    # Restart: same disk, the file written before the stop is still there.
    mgr.start(vm_id)
    with SmolVM.from_id(vm_id, data_dir=vms.data_dir) as again:
        assert again.run("cat /root/marker").output == "persisted"
    # A reconnected VM is stopped, not deleted, on exit.
    assert mgr.get(vm_id).status is VMState.STOPPED

    mgr.delete(vm_id)
    left = _leftovers(mgr, vm_id, info)
    assert left == {
        "process": [],
        "disk": False,
        "vm_dir": False,
        "sockets": [],
        "row": False,
        "ports": [],
        "resources": [],
    }
    with pytest.raises(VMNotFoundError):
        mgr.get(vm_id)
    with pytest.raises(VMNotFoundError):
        mgr.delete(vm_id)
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm_id, data_dir=vms.data_dir)


def test_pause_resume_and_invalid_transitions(vms):
    vm = vms.sandbox().start()
    vm.pause()
    assert vm.status is VMState.PAUSED
    with pytest.raises(InvalidStateError):
        vm.pause()
    vm.resume()
    assert vm.status is VMState.RUNNING
    assert vm.run("echo back").output == "back"
    vm.stop()
    with pytest.raises(InvalidStateError):
        vm.resume()


def test_facade_context_manager_and_properties(vms):
    with vms.sandbox() as vm:
        assert vm.status is VMState.RUNNING
        assert vm.info.vm_id == vm.vm_id
        assert vm.get_ip() == "10.0.2.15"
        assert vm.data_dir == vms.data_dir.resolve()
        assert vm.can_run_commands()
        assert vm.run("uname -s").output == "Linux"
        vm_id, disk = vm.vm_id, vm.info.disk_path
    assert not vms.manager.state.vm_exists(vm_id)
    assert not Path(disk).exists()
    assert qemu_pids_for(vm_id) == []


def test_retain_disk_on_delete(vms):
    with vms.sandbox(VMConfig(retain_disk_on_delete=True)) as vm:
        vm.run("echo keep > /root/k")
        disk = Path(vm.info.disk_path)
    assert disk.exists()
    disk.unlink()


def test_memory_and_disk_size(vms):
    with vms.sandbox(mem_size_mib=1024, disk_size_mib=3072) as vm:
        mem_kb = int(vm.run("awk '/MemTotal/{print $2}' /proc/meminfo").output)
        assert 900_000 < mem_kb <= 1024 * 1024
        # The root filesystem is grown to the requested size in the background at boot.
        deadline = time.monotonic() + 30
        while True:
            size_kb = int(vm.run("df -k / | awk 'NR==2{print $2}'").output)
            if size_kb > 2_900_000 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert size_kb > 2_900_000


def test_reconcile_marks_killed_vm_as_error(vms):
    vm = vms.sandbox().start()
    pid = vm.info.pid
    os.kill(pid, signal.SIGKILL)
    procs.wait_gone(pid, 5)
    assert vms.manager.reconcile() == [vm.vm_id]
    assert vm.status is VMState.ERROR
    assert "reconcile" in (vm.info.error or "")
    with pytest.raises(InvalidStateError):
        vm.start()
    vm.delete()
    assert not vms.manager.state.vm_exists(vm.vm_id)
    assert vms.manager.reconcile() == []


def test_reconcile_removes_orphaned_resources(vms):
    """A crash between recording and using a resource leaves rows without a VM: removed."""
    mgr = vms.manager
    orphan = vms.data_dir / "orphan.file"
    orphan.write_text("x")
    mgr.state.add_resource("ghost", "file", str(orphan))
    mgr.reconcile()
    assert not orphan.exists()
    assert mgr.state.resources("ghost") == []


def test_cross_process_create_list_reconnect_delete(vms):
    """A VM created by one process is listed, used and deleted by another."""
    script = textwrap.dedent(f"""
        from smolvm import SmolVM
        vm = SmolVM(data_dir={str(vms.data_dir)!r})
        vm.start()
        vm.run("echo from-child > /root/child")
        print(vm.vm_id)
        vm.close()   # release handles, leave the VM running
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    vm_id = vms.track(out.stdout.strip().splitlines()[-1])
    listed = {v.vm_id: v for v in vms.manager.list_vms()}
    assert listed[vm_id].status is VMState.RUNNING
    vm = SmolVM.from_id(vm_id, data_dir=vms.data_dir)
    assert vm.run("cat /root/child").output == "from-child"
    vm.delete()
    vm.close()
    assert qemu_pids_for(vm_id) == []


def test_boot_timeout_raises_and_leaves_error_state(vms):
    from smolvm import OperationTimeoutError

    vm = vms.sandbox(cold_boot=True)
    with pytest.raises(OperationTimeoutError) as ei:
        vm.start(boot_timeout=0.2)
    assert ei.value.message and "boot_timeout" in ei.value.message
    assert vm.status is VMState.ERROR
    assert qemu_pids_for(vm.vm_id) == []


def test_wait_gone_wakes_on_exit_and_honours_the_token():
    p = subprocess.Popen(["sleep", "30"])
    token = procs.process_token(p.pid)
    t = time.monotonic()
    assert not procs.wait_gone(p.pid, 0.2, token)  # still running: times out
    assert time.monotonic() - t >= 0.19
    threading.Timer(0.1, p.kill).start()
    t = time.monotonic()
    assert procs.wait_gone(p.pid, 30, token)  # a zombie (not reaped yet) is gone
    assert time.monotonic() - t < 10  # woken by the exit, not by the timeout
    p.wait()
    assert procs.wait_gone(p.pid, 1, token)  # reaped: gone at once
    q = subprocess.Popen(["sleep", "30"])
    try:
        assert procs.wait_gone(q.pid, 1, f"{q.pid}:1")  # same pid, another process
    finally:
        q.kill()
        q.wait()
