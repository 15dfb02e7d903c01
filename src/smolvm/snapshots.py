"""Snapshots: save a VM's memory + device state, freeze its disk, restore any number of clones.

A snapshot is a directory::

    meta.json    what the guest was launched with (restore needs the same machine)
    state        QEMU migration stream: device state, plus RAM for "stream" snapshots
    mem          guest RAM as a sparse file ("file" snapshots only)
    disk.qcow2   the VM's disk overlay at that instant, frozen (read-only from now on)

Two memory formats, chosen automatically:

* **file** — the VM booted with its RAM in a shared memory file (``/dev/shm``, see
  :func:`boot_memory`). Saving writes only device state (``x-ignore-shared``, ~10 ms) and
  copies the RAM file sparsely. A clone maps that file copy-on-write (``share=off``):
  nothing is loaded up front, clones share unmodified pages through the page cache.
* **stream** — RAM was private (the VM is itself a clone): RAM goes into ``state``.

Every clone gets its own qcow2 overlay on ``disk.qcow2``, its own sockets and SSH port,
so one snapshot can be restored many times at once. After a restore (and after every
resume) the host resets the guest clock, reseeds its RNG and pushes the clone's identity
(hostname, SSH host key, authorized_keys, env) through the guest agent: the guest read
its config disk long ago, in the VM the snapshot was taken from.

Image snapshots: the default image gets a booted-and-ready snapshot (kept under
``<image>/snapshots/<key>/``, keyed by the image build and every launch input that
restore needs identical), so ``SmolVM()`` restores instead of cold-booting when its
config matches.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolvm.backends.base import LaunchSpec, MemorySpec, agent_sockets, socket_files
from smolvm.exceptions import (
    InvalidStateError,
    SmolVMError,
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
)
from smolvm.images.builder import artifacts_for_kernel
from smolvm.keys import HostKey, ensure_client_key
from smolvm.transports.base import GUEST_ENV_FILE, ExecRequest
from smolvm.types import VM_ID_RE, NetworkInfo, VMConfig, VMInfo, VMState
from smolvm.vmhost import env_file_text

if TYPE_CHECKING:
    from smolvm.transports.agent import AgentTransport
    from smolvm.vm import SmolVMManager

log = logging.getLogger("smolvm.snapshots")

SNAPSHOT_FORMAT = 3
IMAGE_REF_PREFIX = "image:"
SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"/smolvm-[A-Za-z0-9_-]+\.mem( \(deleted\))?$")
#: Launch fields a restore must reproduce exactly (QEMU refuses or the guest breaks otherwise).
_LAUNCH_KEYS = ("kernel", "initrd", "boot_args", "mem_mib", "vcpus", "net_mode", "accel", "agent_ports")
GUEST_HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"
#: Seconds an image-snapshot build failure is remembered (no retry on every SmolVM()).
_FAILURE_TTL = 600.0


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on disk. ``memory`` is "file" or "stream" (see module docs)."""

    name: str
    path: Path
    source_vm: str | None
    created_at: float
    memory: str
    config: VMConfig
    meta: dict = field(repr=False)
    kind: str = "user"  # "user" (state store) | "image" (image snapshot)

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
        return {"name": self.name, "path": str(self.path), "source_vm": self.source_vm,
                "created_at": self.created_at, "memory": self.memory, "kind": self.kind,
                "parent": self.parent, "size_bytes": self.size_bytes,
                "mem_size_mib": self.config.mem_size_mib, "vcpu_count": self.config.vcpu_count,
                "network": self.config.network}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not VM_ID_RE.match(name):
        raise ValidationError(
            f"invalid snapshot name {name!r}: 1-63 letters, digits, '-' or '_', starting with a "
            "letter or digit", field="name")
    return name


def snapshots_dir(mgr: SmolVMManager) -> Path:
    d = mgr.data_dir / "snapshots"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _config_from(data: dict[str, Any]) -> VMConfig:
    from smolvm.vm import _stored_config

    return _stored_config(data)


def _info_from_row(row: dict[str, Any]) -> SnapshotInfo:
    meta = row["meta"] or {}
    return SnapshotInfo(row["name"], Path(row["path"]), row["source_vm"], row["created_at"],
                        meta.get("memory", "stream"), _config_from(row["config"]), meta)


def get_snapshot(mgr: SmolVMManager, ref: str) -> SnapshotInfo:
    """A user snapshot by name, or an image snapshot by its ``image:<image>/<key>`` ref."""
    if ref.startswith(IMAGE_REF_PREFIX):
        d = _image_ref_dir(mgr, ref)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            raise SnapshotNotFoundError(
                f"image snapshot {ref!r} is gone (its image was rebuilt or removed)") from None
        return SnapshotInfo(ref, d, meta.get("source_vm"), meta.get("created_at", 0.0),
                            meta["memory"], _config_from(meta["config"]), meta, kind="image")
    row = mgr.state.get_snapshot(ref)
    if row is None or not (row["meta"] or {}).get("complete"):
        raise SnapshotNotFoundError(f"no snapshot named {ref!r} (see list_snapshots())")
    return _info_from_row(row)


def gc_incomplete(mgr: SmolVMManager, older_than: float = 600.0) -> list[str]:
    """Remove snapshots a crash left half-written (row + files), older than ``older_than`` s."""
    gone = []
    for row in mgr.state.list_snapshots():
        if not (row["meta"] or {}).get("complete") and time.time() - row["created_at"] > older_than:
            shutil.rmtree(row["path"], ignore_errors=True)
            mgr.state.delete_snapshot(row["name"])
            gone.append(row["name"])
    return gone


def list_snapshots(mgr: SmolVMManager) -> list[SnapshotInfo]:
    return [_info_from_row(r) for r in mgr.state.list_snapshots() if (r["meta"] or {}).get("complete")]


def delete_snapshot(mgr: SmolVMManager, name: str) -> None:
    """Remove a snapshot and its files. Refused while a VM or snapshot is built on it."""
    row = mgr.state.get_snapshot(name)
    if row is None:
        raise SnapshotNotFoundError(f"no snapshot named {name!r}")
    users = [v["vm_id"] for v in mgr.state.list_vms() if v["snapshot"] == name]
    children = [s["name"] for s in mgr.state.list_snapshots() if (s["meta"] or {}).get("parent") == name]
    if users or children:
        raise SnapshotError(
            f"snapshot {name!r} is the base of VMs {users} and snapshots {children}: delete them "
            "first (their disks are overlays on this snapshot's disk)",
            {"vms": users, "snapshots": children})
    shutil.rmtree(row["path"], ignore_errors=True)
    mgr.state.delete_snapshot(name)


# ---------------------------------------------------------------------------- memory
def shared_memory_available() -> bool:
    if os.environ.get("SMOLVM_SHARED_MEMORY", "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def boot_memory(mgr: SmolVMManager, vm_id: str) -> MemorySpec:
    """RAM for a booting QEMU VM: a shared file in /dev/shm (recorded before QEMU creates it,
    unlinked as soon as QEMU has it open), or anonymous RAM under the same RAMBlock id."""
    if not shared_memory_available():
        return MemorySpec(path=None)
    path = SHM_DIR / f"smolvm-{vm_id}-{secrets.token_hex(4)}.mem"
    mgr.state.add_resource(vm_id, "file", str(path))
    return MemorySpec(path=path, shared=True, unlink=True)


def shared_memory_fd(pid: int) -> Path | None:
    """``/proc/<pid>/fd/<n>`` of the VMM's shared RAM file, if its RAM is one."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    for e in entries:
        try:
            target = os.readlink(e)
        except OSError:
            continue
        if target.startswith(str(SHM_DIR) + "/") and _SHM_NAME.search(target):
            return e
    return None


def _sparse_copy(src: Path, dst: Path) -> None:
    proc = subprocess.run(["cp", "--sparse=always", str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapshotError(f"copying guest memory failed: {proc.stderr.strip()}")


# ---------------------------------------------------------------------------- qcow2 overlay
def _qcow2_virtual_size(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] == b"QFI\xfb":
        return struct.unpack(">Q", head[24:32])[0], "qcow2"
    return path.stat().st_size, "raw"


def write_qcow2_overlay(path: Path, backing: Path, *, size: int | None = None) -> None:
    """Create an empty qcow2 (v3, 64 KiB clusters) backed by ``backing`` — what
    ``qemu-img create -f qcow2 -b backing -F fmt`` does, without a 20 ms subprocess."""
    backing = Path(backing).resolve()
    vsize, fmt = _qcow2_virtual_size(backing)
    size = max(size or 0, vsize)
    cs = 1 << 16
    l1_size = max(1, -(-size // (cs * (cs // 8))))
    l1_clusters = -(-(l1_size * 8) // cs)
    nclusters = 3 + l1_clusters  # header, refcount table, refcount block, L1
    name = str(backing).encode()
    ext = struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.encode().ljust(8, b"\0")
    ext += struct.pack(">II", 0, 0)
    header_len = 104
    backing_off = header_len + len(ext)
    if backing_off + len(name) > cs:
        raise SnapshotError(f"backing file path too long: {backing}")
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, backing_off, len(name), 16, size, 0, l1_size,
        3 * cs, 1 * cs, 1, 0, 0, 0, 0, 0, 4, header_len)
    assert len(hdr) == header_len
    refblock = struct.pack(f">{nclusters}H", *([1] * nclusters))
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, hdr + ext + name, 0)
        os.pwrite(fd, struct.pack(">Q", 2 * cs), cs)
        os.pwrite(fd, refblock, 2 * cs)
        os.ftruncate(fd, nclusters * cs)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _backing_of(path: Path) -> str | None:
    with open(path, "rb") as f:
        h = f.read(20)
        if h[:4] != b"QFI\xfb":
            return None
        off, n = struct.unpack(">QI", h[8:20])
        if not off:
            return None
        f.seek(off)
        return f.read(n).decode()


# ---------------------------------------------------------------------------- launch facts
def _launch_facts(spec: LaunchSpec, net: NetworkInfo) -> dict[str, Any]:
    return {"kernel": str(spec.kernel), "initrd": str(spec.initrd) if spec.initrd else None,
            "boot_args": spec.boot_args, "mem_mib": spec.mem_mib, "vcpus": spec.vcpus,
            "net_mode": net.mode, "accel": spec.accel, "agent_ports": spec.agent_ports}


def _image_key(config: VMConfig) -> str | None:
    """Identifies one build of the VM's image (a rebuild replaces rootfs.ext4 in place, and
    every frozen disk layer above it would silently read the new one)."""
    art = artifacts_for_kernel(config.kernel_path) if config.kernel_path else None
    if art is None:
        return None
    return f"{art.manifest.get('local_key')}@{art.manifest.get('built_at')}"


# ---------------------------------------------------------------------------- create
def _save(mgr: SmolVMManager, row: dict[str, Any], d: Path) -> dict[str, Any]:
    """Write ``state`` (+ ``mem``) and ``disk.qcow2`` for a running/paused VM into ``d``.

    Leaves the VM stopped. Returns the snapshot's meta (without name/config)."""
    vm_id = row["vm_id"]
    spec = mgr.spec(row)
    backend = mgr.backend_for(row["backend"])
    mem_fd = shared_memory_fd(row["pid"])
    backend.save_state(spec, d / "state", ignore_shared=mem_fd is not None)
    if mem_fd is not None:
        _sparse_copy(mem_fd, d / "mem")
    # The migration flushed and inactivated the disk: the overlay is consistent now.
    shutil.copyfile(row["disk_path"], d / "disk.qcow2")
    for f in ("state", "mem", "disk.qcow2"):
        if (d / f).exists():
            (d / f).chmod(0o644 if f != "state" else 0o600)
    net = NetworkInfo.model_validate(row["network"])
    cfg_disk = spec.vm_dir / "config.tar"
    _, pub = ensure_client_key(mgr.keys_dir)
    return {
        "format": SNAPSHOT_FORMAT, "memory": "file" if mem_fd is not None else "stream",
        "launch": _launch_facts(spec, net), "mac": net.mac_address,
        "config_disk_size": cfg_disk.stat().st_size if cfg_disk.exists() else None,
        "parent": row["snapshot"], "image_key": _image_key(_config_from(row["config"])),
        "authorized_keys": pub, "env_vars": dict(row["config"].get("env_vars") or {}),
        "backing": _backing_of(d / "disk.qcow2"), "source_vm": vm_id, "created_at": time.time(),
        "state_bytes": (d / "state").stat().st_size,
    }


def create_snapshot(mgr: SmolVMManager, vm_id: str, name: str, *, resume: bool = True,
                    transport: AgentTransport | None = None) -> SnapshotInfo:
    """Snapshot a running or paused VM as ``name``.

    The VM is paused while its state is written and its disk overlay copied (~0.1-0.3 s);
    afterwards a running VM resumes (``resume=False`` leaves it paused) and gets its clock
    reset. ``transport``: the caller's open agent connection, reused for that."""
    _check_name(name)
    row = mgr.state.get_vm(vm_id)
    _check_snapshottable(row)
    status = VMState(row["status"])
    d = snapshots_dir(mgr) / name
    gc_incomplete(mgr)
    if d.exists() and mgr.state.get_snapshot(name) is None:
        shutil.rmtree(d)  # debris of a crash before the row was written
    mgr.state.insert_snapshot(name, source_vm=vm_id, path=str(d), config=row["config"],
                              meta={"complete": False})
    try:
        d.mkdir(parents=True, mode=0o700)
        meta = _save(mgr, row, d)
        meta["complete"] = True
        (d / "meta.json").write_text(json.dumps({**meta, "config": row["config"], "name": name}, indent=1))
        mgr.state.update_snapshot(name, meta=meta)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        mgr.state.delete_snapshot(name)
        if VMState(mgr.state.get_vm(vm_id)["status"]) is VMState.RUNNING:
            mgr._try(lambda: mgr.backend_for(row["backend"]).resume(mgr.spec(row)))
        raise
    if status is VMState.RUNNING and resume:
        mgr.backend_for(row["backend"]).resume(mgr.spec(row))
        refresh_guest(mgr, vm_id, transport)
    else:
        mgr.state.update_vm(vm_id, status=VMState.PAUSED.value)
    return get_snapshot(mgr, name)


def _check_snapshottable(row: dict[str, Any]) -> None:
    vm_id = row["vm_id"]
    if row["backend"] != "qemu":
        raise SnapshotError(f"VM {vm_id}: snapshots need the qemu backend, not {row['backend']}")
    status = VMState(row["status"])
    if status not in (VMState.RUNNING, VMState.PAUSED):
        raise InvalidStateError(f"cannot snapshot VM {vm_id!r}: it is {status.value}; start it first",
                                {"vm_id": vm_id, "status": status.value})
    if (row["network"] or {}).get("mode") == "tap":
        raise SnapshotError(f"VM {vm_id}: snapshots of TAP-networked VMs are not supported yet; "
                            "use network='user' or 'none'")


# ---------------------------------------------------------------------------- clone
def create_clone(mgr: SmolVMManager, ref: str, *, vm_id: str | None = None,
                 env_vars: dict[str, str] | None = None, port_forwards: dict[int, int] | None = None,
                 comm_channel: str | None = None, retain_disk_on_delete: bool | None = None,
                 pool: str | None = None, pool_owner: str | None = None) -> VMInfo:
    """Record a VM that will be restored from snapshot ``ref`` by ``start()`` (status created).

    It gets its own overlay on the snapshot's frozen disk, SSH port, sockets and host key."""
    snap = get_snapshot(mgr, ref)
    _check_files(snap)
    cfg = snap.config.model_dump()
    cfg.pop("vm_id", None)
    upd: dict[str, Any] = {"env_vars": dict(env_vars) if env_vars is not None else snap.config.env_vars}
    if port_forwards is not None:
        upd["port_forwards"] = port_forwards
    if comm_channel is not None:
        upd["comm_channel"] = comm_channel
    if retain_disk_on_delete is not None:
        upd["retain_disk_on_delete"] = retain_disk_on_delete
    config = VMConfig(**{**cfg, **upd, **({"vm_id": vm_id} if vm_id else {})})
    vm_id = config.vm_id
    d = mgr.vm_dir(vm_id)
    disk = mgr.disk_dir / f"{vm_id}.qcow2"
    hk = HostKey.generate()
    extra = {"pool": pool} if pool else {}
    if pool_owner:
        extra["pool_owner"] = pool_owner
    mgr.state.insert_vm(vm_id, status=VMState.CREATED.value, backend="qemu",
                        config=config.model_dump(mode="json"), vm_dir=str(d), disk_path=str(disk),
                        host_key=hk.public_line, snapshot=ref, **extra)
    try:
        mgr.init_vm_dir(vm_id, hk)
        mgr.state.add_resource(vm_id, "disk", str(disk))
        write_qcow2_overlay(disk, snap.path / "disk.qcow2")
        net = mgr.network.allocate(vm_id, config.network, config.port_forwards)
        if snap.meta.get("mac"):
            # The MAC is device state: the clone keeps the snapshot's (each user-mode
            # NIC sits behind its own NAT, so identical MACs never meet).
            net = net.model_copy(update={"mac_address": snap.meta["mac"]})
        mgr.state.update_vm(vm_id, network=net.model_dump(mode="json"))
    except BaseException:
        mgr._purge(vm_id, keep_disk=False)
        raise
    return mgr.get(vm_id)


def _check_files(snap: SnapshotInfo) -> None:
    need = ["state", "disk.qcow2"] + (["mem"] if snap.memory == "file" else [])
    missing = [f for f in need if not (snap.path / f).exists()]
    backing = snap.meta.get("backing")
    if backing and not Path(backing).exists():
        missing.append(backing)
    if missing:
        raise SnapshotError(f"snapshot {snap.name!r} is incomplete (missing {missing}); its image "
                            "or parent snapshot may have been rebuilt or deleted. Delete it.")
    key = snap.meta.get("image_key")
    if key and key != _image_key(snap.config):
        raise SnapshotError(f"snapshot {snap.name!r} was taken on an image that has since been "
                            "rebuilt; delete it and take a new one")


def restore_vm(mgr: SmolVMManager, vm_id: str, *, boot_timeout: float = 30.0, paused: bool = False,
               settle: bool = False) -> VMInfo:
    """Launch a VM made by :func:`create_clone` from its snapshot.

    ``paused``: leave it paused right after loading (no identity push; do that on resume).
    ``settle``: wait until the restarted SSH server listens (pool refills do; ``SmolVM()``
    lets it start in the background at low priority)."""
    row = mgr.state.get_vm(vm_id)
    snap = get_snapshot(mgr, row["snapshot"])
    _check_files(snap)
    if not _has_agent(snap.config):
        raise SnapshotError(f"snapshot {snap.name!r}: restoring needs the guest agent (the clone's "
                            "clock, RNG and identity are reset through it); this image has none")
    mgr.state.update_vm(vm_id, accelerator=snap.meta["launch"]["accel"],
                        accelerator_reason=f"restored from snapshot {snap.name}")
    row = mgr.state.get_vm(vm_id)
    spec = mgr.spec(row)
    facts = _launch_facts(spec, NetworkInfo.model_validate(row["network"]))
    diff = {k: (snap.meta["launch"].get(k), facts[k]) for k in _LAUNCH_KEYS
            if snap.meta["launch"].get(k) != facts[k]}
    if diff:
        raise SnapshotError(f"cannot restore snapshot {snap.name!r} here: the launch would differ "
                            f"in {diff} (snapshot value, value now)", {"diff": diff})
    _write_config_disk(mgr, row, spec, snap)
    spec.incoming = snap.path / "state"
    if snap.memory == "file":
        spec.memory = MemorySpec(snap.path / "mem", shared=False)
        spec.incoming_ignore_shared = True
    else:
        spec.memory = boot_memory(mgr, vm_id)
    backend = mgr.backend_for("qemu")
    if row["pool"]:
        spec.nice = _pool_nice()
    mgr._launch_and_wait(row, spec, boot_timeout)
    try:
        backend.start_incoming(spec, timeout=boot_timeout, cont=not paused)
        if paused:
            mgr.state.update_vm(vm_id, status=VMState.PAUSED.value)
            return mgr.get(vm_id)
        t = _agent(spec, boot_timeout)
        try:
            push_identity(mgr, vm_id, t, snap, settle=settle or row["config"].get("comm_channel") == "ssh")
        except BaseException:
            t.close()
            raise
        mgr._handoff[vm_id] = t
    except SmolVMError as exc:
        _fail(mgr, vm_id, exc)
        raise
    return mgr.get(vm_id)


def _has_agent(config: VMConfig) -> bool:
    art = artifacts_for_kernel(config.kernel_path) if config.kernel_path else None
    return bool(art and art.has_agent)


def _fail(mgr: SmolVMManager, vm_id: str, exc: BaseException) -> None:
    from smolvm import procs

    row = mgr.state.get_vm(vm_id)
    for r in mgr.state.resources(vm_id, "process"):
        pid = int(r["value"].split(":")[0])
        procs.kill(pid, r["value"])
        procs.wait_gone(pid, 5.0, r["value"])
        mgr.state.remove_resource("process", r["value"])
    mgr.state.update_vm(vm_id, status=VMState.ERROR.value, pid=None, error=f"restore failed: {exc}")
    spec = mgr.spec(row)
    for s in socket_files(spec):
        s.unlink(missing_ok=True)


def _pool_nice() -> int:
    try:
        return int(os.environ.get("SMOLVM_POOL_NICE", "10"))
    except ValueError:
        return 10


def _write_config_disk(mgr: SmolVMManager, row: dict[str, Any], spec: LaunchSpec, snap: SnapshotInfo) -> None:
    """The clone's own config disk, padded to the snapshot's size (the device must match;
    the guest does not read it again, but a later cold boot of this VM does)."""
    mgr._write_config_disk(row, spec)
    p = spec.vm_dir / "config.tar"
    want = snap.meta.get("config_disk_size")
    if not want:
        return
    have = p.stat().st_size
    if have > want:  # env vars made it bigger: they reach the guest through the agent anyway
        cfg = dict(row["config"])
        cfg["env_vars"] = {}
        mgr._write_config_disk({**row, "config": cfg}, spec)
        have = p.stat().st_size
        if have > want:
            raise SnapshotError(f"the clone's config disk ({have} bytes) exceeds the snapshot's ({want})")
    if have < want:
        os.truncate(p, want)


def _agent(spec: LaunchSpec, timeout: float) -> AgentTransport:
    from smolvm.transports.agent import AgentTransport

    return AgentTransport(agent_sockets(spec), connect_timeout=timeout)


# ---------------------------------------------------------------------------- identity
_IDENTITY_BG = (
    '(umask 077; mkdir -p /etc/dropbear /root/.ssh; printf %s "$SMOLVM_HOSTKEY" | base64 -d > '
    + GUEST_HOST_KEY + '.new && mv ' + GUEST_HOST_KEY + '.new ' + GUEST_HOST_KEY + '; '
    '[ -n "$SMOLVM_AUTHKEYS" ] && printf "%s\\n" "$SMOLVM_AUTHKEYS" > /root/.ssh/authorized_keys); '
    'printf "%s\\n" "$SMOLVM_HOSTNAME" > /etc/hostname; '
    'printf "127.0.0.1 localhost\\n127.0.1.1 %s\\n" "$SMOLVM_HOSTNAME" > /etc/hosts; '
    '[ -x /usr/sbin/dropbear ] || exit 0; '
    'for p in $old; do while kill -0 $p 2>/dev/null; do usleep 2000; done; done; '
    'pw=-s; [ -f /etc/smolvm/password-auth ] && pw=; '
    '/usr/sbin/dropbear -r ' + GUEST_HOST_KEY + ' -p 22 $pw'
)
_SETTLE = ("; i=0; while [ $i -lt 500 ] && ! grep -q ':0016 00000000:0000 0A' /proc/net/tcp "
           "/proc/net/tcp6 2>/dev/null; do usleep 10000; i=$((i+1)); done")


#: Stop every dropbear with shell builtins only (no fork/exec: each costs ~10-50 ms on a
#: freshly restored TCG guest, whose translation cache is empty).
_KILL_SSHD = ('old=; for d in /proc/[0-9]*; do read -r c < $d/comm 2>/dev/null && '
              '[ "$c" = dropbear ] && old="$old ${d#/proc/}"; done; [ -n "$old" ] && kill $old; ')


def _identity_script(settle: bool, env_file: bool, sshd_running: bool = True) -> str:
    """One guest command that makes a restored guest this VM.

    An SSH server left running by the snapshot (its host key and authorized_keys belong to
    the source) is stopped at once; image snapshots are taken with it stopped. The env
    file is written before the command returns. The new host key, authorized_keys,
    /etc/hostname, /etc/hosts and the SSH server start follow in the background, a second
    later and at the lowest priority, so a first command does not compete with them —
    unless ``settle``, which does it all before returning and waits for port 22."""
    head = _KILL_SSHD if sshd_running else ""
    if env_file:
        head += f'printf %s "$SMOLVM_ENVFILE" > {GUEST_ENV_FILE}; '
    if settle:
        return head + "{ " + _IDENTITY_BG + _SETTLE + "; } </dev/null >/dev/null 2>&1; true"
    return (head + "( sleep 1; read -r me _ < /proc/self/stat; renice -n 19 -p $me; " + _IDENTITY_BG
            + " ) </dev/null >/dev/null 2>&1 & true")


def push_identity(mgr: SmolVMManager, vm_id: str, t: AgentTransport, snap: SnapshotInfo | None = None,
                  *, settle: bool = False) -> None:
    """Make a restored guest this VM: clock, entropy, hostname, SSH keys, env vars.

    Three control ops and one command: under TCG every guest code path runs through the
    translator the first time, so fewer, shared paths are what keeps a restore fast."""
    import base64

    row = mgr.state.get_vm(vm_id)
    t.sync_time()
    t.add_entropy(os.urandom(64))
    host = vm_id[:63]
    t.set_hostname(host)
    key = (mgr.vm_dir(vm_id) / "ssh_host_key").read_bytes()
    env = {"SMOLVM_HOSTKEY": base64.b64encode(key).decode(), "SMOLVM_HOSTNAME": host}
    _, pub = ensure_client_key(mgr.keys_dir)
    if snap is None or snap.meta.get("authorized_keys") != pub:
        env["SMOLVM_AUTHKEYS"] = pub
    env_vars = dict(row["config"].get("env_vars") or {})
    write_env = snap is None or env_vars != (snap.meta.get("env_vars") or {})
    if write_env:
        env["SMOLVM_ENVFILE"] = env_file_text(env_vars)
    sshd_running = snap is None or snap.meta.get("sshd") != "stopped"
    res = t.exec(ExecRequest(_identity_script(settle, write_env, sshd_running), "raw", 30, env=env))
    if not res.ok:
        raise SnapshotError(f"VM {vm_id}: setting the clone's identity failed "
                            f"(exit {res.exit_code}): {res.stderr.strip()[-300:]}")


def refresh_guest(mgr: SmolVMManager, vm_id: str, transport: AgentTransport | None = None,
                  *, timeout: float = 2.0) -> bool:
    """After a resume: set the guest clock and reseed its RNG. Best effort (False if the
    agent is unreachable, e.g. another process holds its channel)."""
    own = transport is None
    t = transport
    row = mgr.state.get_vm(vm_id)
    if t is None and not _has_agent(_config_from(row["config"])):
        return False  # SSH-only image: nothing to talk to (its clock catches up by NTP, if any)
    try:
        if t is None:
            cached = mgr._handoff.get(vm_id)
            if cached is not None:
                t = cached
                own = False
            else:
                t = _agent(mgr.spec(row), timeout)
        t.sync_time()
        t.add_entropy(os.urandom(64))
        return True
    except SmolVMError as exc:
        log.info("VM %s: guest clock/RNG not refreshed after resume: %s", vm_id, exc)
        return False
    finally:
        if own and t is not None:
            t.close()


def _image_ref_dir(mgr: SmolVMManager, ref: str) -> Path:
    body = ref[len(IMAGE_REF_PREFIX):]
    image, _, key = body.partition("/")
    if not image or not key or "/" in key or ".." in body:
        raise SnapshotNotFoundError(f"bad image snapshot ref {ref!r}")
    return mgr.image_dir / image / "snapshots" / key


# The image-snapshot half lives in smolvm.image_snapshots; these names stay importable here.
_IMAGE_API = frozenset({
    "build_default_snapshot", "default_snapshot_for", "discard_image_snapshot",
    "ensure_image_snapshot", "image_snapshot_ref", "prune_image_snapshots", "snapshot_boot_enabled",
})


def __getattr__(name: str) -> Any:
    if name in _IMAGE_API:
        from smolvm import image_snapshots

        return getattr(image_snapshots, name)
    raise AttributeError(f"module 'smolvm.snapshots' has no attribute {name!r}")
