"""Saving a VM: memory + device state and its frozen disk layer.

Two memory formats, chosen automatically:

* **file** — the VM booted with its RAM in a shared memory file (``/dev/shm``, see
  :mod:`smolvm.runtime.memory`). Saving writes only device state (``x-ignore-shared``,
  ~10 ms) and copies the RAM file sparsely.
* **stream** — RAM was private (the VM is itself a clone): RAM goes into ``state``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from smolvm.exceptions import InvalidStateError, SmolVMError, SnapshotError
from smolvm.keys import ensure_client_key
from smolvm.runtime import Runtime, lifetime
from smolvm.runtime.memory import shared_memory_fd
from smolvm.runtime.overlay import backing_file
from smolvm.snapshots.records import (
    SNAPSHOT_FORMAT,
    SnapshotInfo,
    check_name,
    gc_incomplete,
    get_snapshot,
    image_key,
    launch_facts,
    snapshots_dir,
)
from smolvm.state.records import VMRecord, encode_config
from smolvm.transports.base import Transport
from smolvm.types import VMState


def _sparse_copy(src: Path, dst: Path) -> None:
    proc = subprocess.run(["cp", "--sparse=always", str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapshotError(f"copying guest memory failed: {proc.stderr.strip()}")


def save_vm_state(rt: Runtime, rec: VMRecord, d: Path) -> dict[str, Any]:
    """Write ``state`` (+ ``mem``) and ``disk.qcow2`` of a running/paused VM into ``d``.

    Leaves the VM stopped. Returns the snapshot's meta (without name/config)."""
    spec = rt.spec(rec)
    backend = rt.backend_for(rec.backend)
    mem_fd = shared_memory_fd(rec.pid) if backend.supports_memory_file else None
    backend.save_state(spec, d / "state", ignore_shared=mem_fd is not None)
    if mem_fd is not None:
        _sparse_copy(mem_fd, d / "mem")
    # The migration flushed and inactivated the disk: the overlay is consistent now.
    shutil.copyfile(rec.disk_path or "", d / "disk.qcow2")
    for f in ("state", "mem", "disk.qcow2"):
        if (d / f).exists():
            (d / f).chmod(0o644 if f != "state" else 0o600)
    cfg_disk = spec.vm_dir / "config.tar"
    _, pub = ensure_client_key(rt.keys_dir)
    return {
        "format": SNAPSHOT_FORMAT,
        "backend": rec.backend,
        "memory": "file" if mem_fd is not None else "stream",
        "launch": launch_facts(spec, rec.network),
        "mac": rec.network.mac_address,
        "config_disk_size": cfg_disk.stat().st_size if cfg_disk.exists() else None,
        "parent": rec.snapshot,
        "image_key": image_key(rec.config),
        "authorized_keys": pub,
        "env_vars": dict(rec.config.env_vars or {}),
        "backing": backing_file(d / "disk.qcow2"),
        "source_vm": rec.vm_id,
        "created_at": time.time(),
        "state_bytes": (d / "state").stat().st_size,
    }


def check_snapshottable(rt: Runtime, rec: VMRecord) -> None:
    if not rt.backend_for(rec.backend).supports_snapshots:
        raise SnapshotError(
            f"VM {rec.vm_id}: the {rec.backend} backend cannot snapshot VMs; use backend='qemu'"
        )
    if rec.status not in (VMState.RUNNING, VMState.PAUSED):
        raise InvalidStateError(
            f"cannot snapshot VM {rec.vm_id!r}: it is {rec.status.value}; start it first",
            {"vm_id": rec.vm_id, "status": rec.status.value},
        )
    if rec.config.workspace_mounts:
        raise SnapshotError(
            f"VM {rec.vm_id}: snapshots of VMs with workspace mounts are not supported (the "
            "host directory is not part of a snapshot and QEMU cannot migrate a mounted 9p "
            "share); snapshot a VM without mounts and copy files in with upload_file()"
        )
    if rec.network.mode == "tap":
        raise SnapshotError(
            f"VM {rec.vm_id}: snapshots of TAP-networked VMs are not supported yet; "
            "use network='user' or 'none'"
        )


def create_snapshot(
    rt: Runtime, vm_id: str, name: str, *, resume: bool = True, transport: Transport | None = None
) -> SnapshotInfo:
    """Snapshot a running or paused VM as ``name``.

    The VM is paused while its state is written and its disk overlay copied (~0.1-0.3 s);
    afterwards a running VM resumes (``resume=False`` leaves it paused) and gets its clock
    reset. ``transport``: the caller's open agent connection, reused for that."""
    check_name(name)
    rec = rt.state.get_vm(vm_id)
    check_snapshottable(rt, rec)
    d = snapshots_dir(rt) / name
    gc_incomplete(rt)
    if d.exists() and rt.state.get_snapshot(name) is None:
        shutil.rmtree(d)  # debris of a crash before the row was written
    config = encode_config(rec.config)
    owner = lifetime.ensure_watchdog(rt)  # if this process dies mid-save, it removes the half
    meta0 = {"complete": False, "owner": owner}
    rt.state.insert_snapshot(name, source_vm=vm_id, path=str(d), config=config, meta=meta0)
    backend = rt.backend_for(rec.backend)
    try:
        d.mkdir(parents=True, mode=0o700)
        meta = save_vm_state(rt, rec, d)
        meta["complete"] = True
        (d / "meta.json").write_text(json.dumps({**meta, "config": config, "name": name}, indent=1))
        rt.state.update_snapshot(name, meta=meta)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        rt.state.delete_snapshot(name)
        if rt.state.get_vm(vm_id).status is VMState.RUNNING:
            try:
                backend.resume(rt.spec(rec))
            except SmolVMError:
                pass  # the original error is what the caller needs
        raise
    if rec.status is VMState.RUNNING and resume:
        backend.resume(rt.spec(rec))
        rt.refresh_guest(vm_id, transport)
    else:
        rt.state.update_vm(vm_id, status=VMState.PAUSED)
    return get_snapshot(rt, name)
