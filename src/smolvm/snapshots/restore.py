"""Restoring snapshots: clones with their own disk overlay, sockets, ports and identity.

Every clone gets its own qcow2 overlay on the snapshot's frozen ``disk.qcow2``, so one
snapshot can be restored many times at once. "file" snapshots map ``mem`` copy-on-write
(``share=off``): nothing is loaded up front, clones share unmodified pages through the
page cache. After a restore the host resets the guest clock, reseeds its RNG and pushes
the clone's identity (:mod:`smolvm.runtime.identity`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smolvm.backends.base import LaunchSpec, MemorySpec
from smolvm.backends.qemu import QemuBackend
from smolvm.envflags import env_int
from smolvm.exceptions import SmolVMError, SnapshotError
from smolvm.keys import ensure_client_key
from smolvm.runtime import BOOT_TIMEOUT, Runtime
from smolvm.runtime.channels import agent_transport
from smolvm.runtime.identity import GuestState, Identity, push_identity
from smolvm.runtime.memory import boot_memory
from smolvm.runtime.overlay import write_overlay
from smolvm.snapshots.records import (
    LAUNCH_KEYS,
    SnapshotInfo,
    get_snapshot,
    image_key,
    launch_facts,
    restore_spec_cpu,
)
from smolvm.state.records import VMRecord
from smolvm.types import InternetSettings, VMConfig, VMInfo, VMState


def create_clone(
    rt: Runtime,
    ref: str,
    *,
    vm_id: str | None = None,
    env_vars: dict[str, str] | None = None,
    port_forwards: dict[int, int] | None = None,
    comm_channel: str | None = None,
    retain_disk_on_delete: bool | None = None,
    internet_settings: InternetSettings | dict[str, Any] | None = None,
    pool: str | None = None,
    pool_owner: str | None = None,
) -> VMInfo:
    """Record a VM that will be restored from snapshot ``ref`` by ``start()`` (status created).

    It gets its own overlay on the snapshot's frozen disk, SSH port, sockets and host key."""
    snap = get_snapshot(rt, ref)
    check_files(snap)
    cfg = snap.config.model_dump()
    cfg.pop("vm_id", None)
    upd: dict[str, Any] = {"env_vars": dict(env_vars) if env_vars is not None else snap.config.env_vars}
    if port_forwards is not None:
        upd["port_forwards"] = port_forwards
    if comm_channel is not None:
        upd["comm_channel"] = comm_channel
    if internet_settings is not None:  # else the snapshot's own policy
        upd["internet_settings"] = internet_settings
    if retain_disk_on_delete is not None:
        upd["retain_disk_on_delete"] = retain_disk_on_delete
    config = VMConfig(**{**cfg, **upd, **({"vm_id": vm_id} if vm_id else {})})
    disk = rt.disk_dir / f"{config.vm_id}.qcow2"
    # The MAC is device state: the clone keeps the snapshot's (each user-mode NIC sits
    # behind its own NAT, so identical MACs never meet).
    backend = snap.meta.get("backend") or QemuBackend.name  # older snapshots: all QEMU
    return rt.provision(
        config,
        backend,
        disk,
        lambda: write_overlay(disk, snap.path / "disk.qcow2"),
        snapshot=ref,
        pool=pool,
        pool_owner=pool_owner,
        mac=snap.meta.get("mac"),
    )


def check_files(snap: SnapshotInfo) -> None:
    """Refuse a snapshot whose files, backing layers or image are gone or rebuilt."""
    need = ["state", "disk.qcow2"] + (["mem"] if snap.memory == "file" else [])
    missing = [f for f in need if not (snap.path / f).exists()]
    backing = snap.meta.get("backing")
    if backing and not Path(backing).exists():
        missing.append(backing)
    if missing:
        raise SnapshotError(
            f"snapshot {snap.name!r} is incomplete (missing {missing}); its image "
            "or parent snapshot may have been rebuilt or deleted. Delete it."
        )
    key = snap.meta.get("image_key")
    if key and key != image_key(snap.config):
        raise SnapshotError(
            f"snapshot {snap.name!r} was taken on an image that has since been "
            "rebuilt; delete it and take a new one"
        )


def restore_vm(
    rt: Runtime, vm_id: str, *, boot_timeout: float = BOOT_TIMEOUT, paused: bool = False, settle: bool = False
) -> VMInfo:
    """Launch a VM made by :func:`create_clone` from its snapshot.

    ``paused``: leave it paused right after loading (no identity push; do that on resume).
    ``settle``: wait until the restarted SSH server listens (pool refills and SSH-channel
    sandboxes do; ``SmolVM()`` lets it start in the background at low priority). The
    restore's agent connection is kept in ``rt`` for the next ``transport()`` call."""
    rec = rt.state.get_vm(vm_id)
    rt.check_startable(rec)
    assert rec.snapshot is not None
    snap = get_snapshot(rt, rec.snapshot)
    check_files(snap)
    if not rt.has_agent(snap.config):
        raise SnapshotError(
            f"snapshot {snap.name!r}: restoring needs the guest agent (the clone's "
            "clock, RNG and identity are reset through it); this image has none"
        )
    rt.state.update_vm(
        vm_id,
        accelerator=snap.meta["launch"]["accel"],
        accelerator_reason=f"restored from snapshot {snap.name}",
    )
    rec = rt.state.get_vm(vm_id)
    backend = rt.backend_for(rec.backend)
    spec = rt.spec(rec)
    facts = launch_facts(spec, rec.network)
    diff = {
        k: (snap.meta["launch"].get(k), facts[k])
        for k in LAUNCH_KEYS
        if snap.meta["launch"].get(k) != facts[k]
    }
    if diff:
        raise SnapshotError(
            f"cannot restore snapshot {snap.name!r} here: the launch would differ "
            f"in {diff} (snapshot value, value now)",
            {"diff": diff},
        )
    _write_config_disk(rt, rec, spec, snap)
    spec.incoming = snap.path / "state"
    spec.cpu = restore_spec_cpu(snap.meta)
    if snap.memory == "file":
        spec.memory = MemorySpec(snap.path / "mem", shared=False)
        spec.incoming_ignore_shared = True
    else:
        spec.memory = boot_memory(rt.state, vm_id)
    if rec.pool:
        spec.nice = env_int("SMOLVM_POOL_NICE", 10)
    rt.launch(rec, spec, boot_timeout)
    try:
        backend.start_incoming(spec, timeout=boot_timeout, cont=not paused)
        if paused:
            rt.state.update_vm(vm_id, status=VMState.PAUSED)
            return rt.get(vm_id)
        t = agent_transport(spec, backend, connect_timeout=boot_timeout)
        try:
            push_identity(
                t,
                identity_of(rt, rec),
                guest_state_of(snap),
                settle=settle or rec.config.comm_channel == "ssh",
            )
        except BaseException:
            t.close()
            raise
        rt.hand_off(vm_id, t)
    except SmolVMError as exc:
        rt.fail(vm_id, f"restore failed: {exc}")
        raise
    return rt.get(vm_id)


def identity_of(rt: Runtime, rec: VMRecord) -> Identity:
    """Who the VM of ``rec`` is: hostname, host key, trusted client key, env vars."""
    _, pub = ensure_client_key(rt.keys_dir)
    return Identity(
        hostname=rec.vm_id[:63],
        host_key=(rt.vm_dir(rec.vm_id) / "ssh_host_key").read_bytes(),
        authorized_keys=pub,
        env_vars=dict(rec.config.env_vars or {}),
    )


def guest_state_of(snap: SnapshotInfo) -> GuestState:
    """What a guest restored from ``snap`` already has."""
    return GuestState(
        authorized_keys=snap.meta.get("authorized_keys"),
        env_vars=dict(snap.meta.get("env_vars") or {}),
        sshd_running=snap.meta.get("sshd") != "stopped",
    )


def _write_config_disk(rt: Runtime, rec: VMRecord, spec: LaunchSpec, snap: SnapshotInfo) -> None:
    """The clone's own config disk, padded to the snapshot's size (the device must match;
    the guest does not read it again, but a later cold boot of this VM does)."""
    p = rt.write_config_disk(rec, spec)
    want = snap.meta.get("config_disk_size")
    if not want:
        return
    have = p.stat().st_size
    if have > want:  # env vars made it bigger: they reach the guest through the agent anyway
        rt.write_config_disk(rec, spec, with_env=False)
        have = p.stat().st_size
        if have > want:
            raise SnapshotError(f"the clone's config disk ({have} bytes) exceeds the snapshot's ({want})")
    if have < want:
        os.truncate(p, want)
