"""The resource ledger: every host resource a VM owns (process, socket, file, disk, dir,
TAP, nft rule, lease) is recorded in the state store *before* it is created, so it can be
removed after a crash by whoever finds it (delete, ``reconcile()``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from smolvm import procs
from smolvm.backends.base import agent_lock_path
from smolvm.network import tap
from smolvm.state import StateStore

KINDS = ("process", "helper", "socket", "file", "disk", "dir", "tap", "nft", "lease")


def process_token(state: StateStore, vm_id: str) -> str | None:
    """The ``pid:starttime`` token of the VM's recorded VMM process, if any."""
    return next((r["value"] for r in state.resources(vm_id, "process")), None)


def remove(state: StateStore, r: dict[str, Any], *, keep_disk: bool = False) -> None:
    """Remove one recorded resource from the host, then from the ledger."""
    kind, value = r["kind"], r["value"]
    if kind in ("process", "helper"):
        pid = int(value.split(":")[0])
        procs.kill(pid, value)
        procs.wait_gone(pid, 5.0, value)
    elif kind in ("socket", "file"):
        Path(value).unlink(missing_ok=True)
        if kind == "socket":
            agent_lock_path(Path(value)).unlink(missing_ok=True)  # agent ports' lock files
    elif kind == "disk":
        if keep_disk:
            return
        Path(value).unlink(missing_ok=True)
    elif kind == "dir":
        _kill_unrecorded_vmm(Path(value))
        shutil.rmtree(value, ignore_errors=True)
    elif kind in ("tap", "nft", "lease"):
        tap.remove_resource(kind, value)
    state.remove_resource(kind, value)


def _kill_unrecorded_vmm(vm_dir: Path) -> None:
    """A VMM spawned in the instant before it could be recorded (its owner killed right
    then) still names itself in its pidfile: kill it if that pid is this VM's QEMU."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if f"smolvm-{vm_dir.name}".encode() in argv:
        procs.kill(pid)
        procs.wait_gone(pid, 5.0)


def kill_processes(state: StateStore, vm_id: str) -> None:
    """Kill the VM's recorded processes (waiting until they are gone) and forget them."""
    rs = [r for kind in ("process", "helper") for r in state.resources(vm_id, kind)]
    for r in rs:  # signal them all first, so they die in parallel
        procs.kill(int(r["value"].split(":")[0]), r["value"])
    for r in rs:
        remove(state, r)


def remove_all(state: StateStore, vm_id: str, *, keep_disk: bool = False) -> None:
    for r in state.resources(vm_id):
        remove(state, r, keep_disk=keep_disk)


def remove_orphans(state: StateStore) -> int:
    """Remove resources whose VM row is gone (a crash between creation and the row's
    deletion); returns how many."""
    known = {rec.vm_id for rec in state.list_vms()}
    n = 0
    for r in state.resources():
        if r["vm_id"] not in known:
            remove(state, r)
            n += 1
    return n
