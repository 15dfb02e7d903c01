"""Snapshot records: what a snapshot is on disk and in the state store, and lookups.

A snapshot is a directory::

    meta.json    what the guest was launched with (restore needs the same machine)
    state        VMM migration stream: device state, plus RAM for "stream" snapshots
    mem          guest RAM as a sparse file ("file" snapshots only)
    disk.qcow2   the VM's disk overlay at that instant, frozen (read-only from now on)

User snapshots have a row in the state store (``<data>/snapshots/<name>/``); image
snapshots live under ``<image>/snapshots/<key>/`` and are named ``image:<image>/<key>``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvm.backends.base import LaunchSpec
from smolvm.backends.qemu import QEMU_DEFAULT_CPU, guest_cpu
from smolvm.exceptions import SnapshotError, SnapshotNotFoundError, ValidationError
from smolvm.images.artifacts import artifacts_for_kernel
from smolvm.runtime import Runtime
from smolvm.state.records import SnapshotRecord, decode_config
from smolvm.types import VM_ID_RE, NetworkInfo, VMConfig

SNAPSHOT_FORMAT = 3
IMAGE_REF_PREFIX = "image:"
#: Launch fields a restore must reproduce exactly (QEMU refuses or the guest breaks otherwise).
LAUNCH_KEYS = ("kernel", "initrd", "boot_args", "mem_mib", "vcpus", "net_mode", "accel", "agent_ports")
#: Seconds before a half-written snapshot counts as debris of a crash.
INCOMPLETE_GRACE = 600.0


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on disk. ``memory`` is "file" or "stream" (see module docs)."""

    name: str
    path: Path
    source_vm: str | None
    created_at: float
    memory: str
    config: VMConfig
    meta: dict[str, Any] = field(repr=False)
    kind: str = "user"  # "user" (state store) | "image" (image snapshot)

    @property
    def snapshot_id(self) -> str:
        """What ``SmolVM.from_snapshot`` takes (the name)."""
        return self.name

    @property
    def size_bytes(self) -> int:
        """Bytes allocated on disk by the state, memory and disk files."""
        total = 0
        for f in ("state", "mem", "disk.qcow2"):
            try:
                total += (self.path / f).stat().st_blocks * 512
            except OSError:
                pass
        return total

    @property
    def parent(self) -> str | None:
        return self.meta.get("parent")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "source_vm": self.source_vm,
            "created_at": self.created_at,
            "memory": self.memory,
            "kind": self.kind,
            "parent": self.parent,
            "size_bytes": self.size_bytes,
            "mem_size_mib": self.config.mem_size_mib,
            "vcpu_count": self.config.vcpu_count,
            "network": self.config.network,
        }

    @classmethod
    def from_record(cls, rec: SnapshotRecord) -> SnapshotInfo:
        return cls(
            rec.name,
            rec.path,
            rec.source_vm,
            rec.created_at,
            rec.meta.get("memory", "stream"),
            rec.config,
            rec.meta,
        )


def check_name(name: str) -> str:
    if not isinstance(name, str) or not VM_ID_RE.match(name):
        raise ValidationError(
            f"invalid snapshot name {name!r}: 1-63 letters, digits, '-' or '_', starting with a "
            "letter or digit",
            field="name",
        )
    return name


def snapshots_dir(rt: Runtime) -> Path:
    d = rt.data_dir / "snapshots"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def image_ref_dir(rt: Runtime, ref: str) -> Path:
    """The directory of image snapshot ``image:<image>/<key>``."""
    body = ref[len(IMAGE_REF_PREFIX) :]
    image, _, key = body.partition("/")
    if not image or not key or "/" in key or ".." in body:
        raise SnapshotNotFoundError(f"bad image snapshot ref {ref!r}")
    return rt.image_dir / image / "snapshots" / key


def get_snapshot(rt: Runtime, ref: str) -> SnapshotInfo:
    """A user snapshot by name, or an image snapshot by its ``image:<image>/<key>`` ref."""
    if ref.startswith(IMAGE_REF_PREFIX):
        d = image_ref_dir(rt, ref)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            raise SnapshotNotFoundError(
                f"image snapshot {ref!r} is gone (its image was rebuilt or removed)"
            ) from None
        return SnapshotInfo(
            ref,
            d,
            meta.get("source_vm"),
            meta.get("created_at", 0.0),
            meta["memory"],
            decode_config(meta["config"]),
            meta,
            kind="image",
        )
    rec = rt.state.get_snapshot(ref)
    if rec is None or not rec.complete:
        raise SnapshotNotFoundError(f"no snapshot named {ref!r} (see list_snapshots())")
    return SnapshotInfo.from_record(rec)


def list_snapshots(rt: Runtime) -> list[SnapshotInfo]:
    return [SnapshotInfo.from_record(r) for r in rt.state.list_snapshots() if r.complete]


def gc_incomplete(rt: Runtime, older_than: float = INCOMPLETE_GRACE) -> list[str]:
    """Remove snapshots a crash left half-written (row + files), older than ``older_than`` s."""
    gone = []
    for rec in rt.state.list_snapshots():
        if not rec.complete and time.time() - rec.created_at > older_than:
            shutil.rmtree(rec.path, ignore_errors=True)
            rt.state.delete_snapshot(rec.name)
            gone.append(rec.name)
    return gone


def delete_snapshot(rt: Runtime, name: str) -> None:
    """Remove a snapshot and its files. Refused while a VM or snapshot is built on it."""
    rec = rt.state.get_snapshot(name)
    if rec is None:
        raise SnapshotNotFoundError(f"no snapshot named {name!r}")
    users = [v.vm_id for v in rt.state.list_vms() if v.snapshot == name]
    children = [s.name for s in rt.state.list_snapshots() if s.meta.get("parent") == name]
    if users or children:
        raise SnapshotError(
            f"snapshot {name!r} is the base of VMs {users} and snapshots {children}: delete them "
            "first (their disks are overlays on this snapshot's disk)",
            {"vms": users, "snapshots": children},
        )
    shutil.rmtree(rec.path, ignore_errors=True)
    rt.state.delete_snapshot(name)


def launch_facts(spec: LaunchSpec, net: NetworkInfo) -> dict[str, Any]:
    """The launch inputs a restore must repeat (:data:`LAUNCH_KEYS`)."""
    return {
        "kernel": str(spec.kernel),
        "initrd": str(spec.initrd) if spec.initrd else None,
        "boot_args": spec.boot_args,
        "mem_mib": spec.mem_mib,
        "vcpus": spec.vcpus,
        "net_mode": net.mode,
        "accel": spec.accel,
        "agent_ports": spec.agent_ports,
        # Not compared: a restore repeats the snapshot's CPU model (restore_spec_cpu).
        "cpu": guest_cpu(spec),
    }


def restore_spec_cpu(meta: dict[str, Any]) -> str | None:
    """The CPU model a restore of a snapshot with ``meta`` must launch with: the one it
    was taken with (snapshots that predate the record ran QEMU's default model)."""
    launch = meta.get("launch") or {}
    if launch.get("accel") != "tcg":
        return None
    return launch.get("cpu") or QEMU_DEFAULT_CPU


def image_key(config: VMConfig) -> str | None:
    """Identifies one build of the VM's image (a rebuild replaces rootfs.ext4 in place, and
    every frozen disk layer above it would silently read the new one)."""
    art = artifacts_for_kernel(config.kernel_path) if config.kernel_path else None
    if art is None:
        return None
    return f"{art.manifest.get('local_key')}@{art.manifest.get('built_at')}"
