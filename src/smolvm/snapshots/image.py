"""Image snapshots: a booted-and-ready snapshot per image and launch configuration, so
``SmolVM()`` restores (~0.3 s) instead of cold-booting (~3 s under TCG).

Kept under ``<image>/snapshots/<key>/``, keyed by the image build and every launch input a
restore needs identical; built once under a file lock (``smolvm image build``, setup, or
the first ``SmolVM()``). Image builds themselves only produce artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from smolvm.envflags import env_flag
from smolvm.exceptions import SmolVMError, SnapshotError
from smolvm.images.artifacts import DEFAULT_IMAGE, artifacts_for_kernel
from smolvm.locks import file_lock
from smolvm.network.manager import USER_GATEWAY, USER_GUEST_IP
from smolvm.runtime import Runtime
from smolvm.runtime.identity import STOP_SSHD
from smolvm.runtime.memory import shared_memory_available
from smolvm.snapshots.records import IMAGE_REF_PREFIX, SNAPSHOT_FORMAT, image_ref_dir, launch_facts
from smolvm.snapshots.save import save_vm_state
from smolvm.state.records import VMRecord, encode_config
from smolvm.transports.base import ExecRequest
from smolvm.types import NetworkInfo, VMConfig, VMState

log = logging.getLogger(__name__)

#: Seconds an image-snapshot build failure is remembered (no retry on every SmolVM()).
FAILURE_TTL = 600.0


def snapshot_boot_enabled() -> bool:
    """``SmolVM()`` may restore image snapshots (``SMOLVM_SNAPSHOT_BOOT=0`` turns it off)."""
    return env_flag("SMOLVM_SNAPSHOT_BOOT", True)


def image_snapshot_ref(rt: Runtime, config: VMConfig) -> str | None:
    """The image-snapshot ref for a resolved ``config``, or None when its VMs cannot be
    restored from one (no agent in the image, no snapshot support, TAP networking, ...)."""
    if config.kernel_path is None or config.rootfs_path is None:
        return None
    art = artifacts_for_kernel(config.kernel_path)
    if art is None or not art.has_agent or art.rootfs != Path(config.rootfs_path):
        return None
    if config.initrd_path is not None or config.network == "tap" or config.workspace_mounts:
        return None
    name = config.backend if config.backend and config.backend != "auto" else rt.backend
    backend = rt.backend_for(name)
    if not backend.supports_snapshots:
        return None
    accel, _ = rt.accelerator()
    net = _probe_net(config.network)
    now = time.time()
    probe = VMRecord(
        vm_id="probe",
        status=VMState.CREATED,
        backend=name,
        config=config,
        network=net,
        pid=None,
        accelerator=accel,
        accelerator_reason=None,
        vm_dir=None,
        disk_path="/nonexistent",
        host_key=None,
        error=None,
        snapshot=None,
        pool=None,
        pool_owner=None,
        created_at=now,
        started_at=None,
        updated_at=now,
    )
    facts = launch_facts(rt.spec(probe), net)
    key_src = {
        "format": SNAPSHOT_FORMAT,
        "image": art.manifest.get("local_key"),
        "built_at": art.manifest.get("built_at"),
        "rootfs": str(art.rootfs),
        "disk_size_mib": config.disk_size_mib,
        "shared_memory": shared_memory_available(),
        **facts,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    return f"{IMAGE_REF_PREFIX}{art.name}/{key}"


def _probe_net(mode: str) -> NetworkInfo:
    if mode == "none":
        return NetworkInfo(mode="none")
    return NetworkInfo(mode="user", guest_ip=USER_GUEST_IP, gateway_ip=USER_GATEWAY)


def default_snapshot_for(rt: Runtime, config: VMConfig, *, create: bool = True) -> str | None:
    """The image snapshot ``SmolVM()`` may restore for ``config`` (resolved), creating it on
    first use; None when the config does not match the default one (cold boot)."""
    if not snapshot_boot_enabled():
        return None
    if config.disk_size_mib is not None or config.boot_args != VMConfig.model_fields["boot_args"].default:
        return None
    default = VMConfig()
    if (config.mem_size_mib, config.vcpu_count, config.network) != (
        default.mem_size_mib,
        default.vcpu_count,
        default.network,
    ):
        return None
    if Path(config.kernel_path or "").parent != rt.image_dir / DEFAULT_IMAGE:
        return None
    ref = image_snapshot_ref(rt, config)
    if ref is None:
        return None
    if (image_ref_dir(rt, ref) / "meta.json").exists():
        return ref
    if not create or _recently_failed(image_ref_dir(rt, ref)):
        return None
    try:
        return ensure_image_snapshot(rt, config)
    except SmolVMError as exc:
        log.warning("no boot snapshot for the default image (cold boot instead): %s", exc)
        return None


def ensure_image_snapshot(rt: Runtime, config: VMConfig | None = None, *, boot_timeout: float = 60.0) -> str:
    """Create (once, under a lock) the booted-and-ready snapshot of ``config``'s image.

    Boots a template VM, lets it settle, snapshots it and deletes it (~4 s under TCG)."""
    config = rt.resolve_image(config or VMConfig())
    ref = image_snapshot_ref(rt, config)
    if ref is None:
        raise SnapshotError(
            "this config cannot be restored from an image snapshot (image without "
            "agent, backend without snapshots, custom initrd or TAP networking)"
        )
    final = image_ref_dir(rt, ref)
    if (final / "meta.json").exists():
        return ref
    root = final.parent
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    failed = root / f".{final.name}.failed"
    if _recently_failed(final):
        raise SnapshotError(f"{ref} failed recently ({failed.read_text().strip()[:300]})")
    with file_lock(root / f".{final.name}.lock"):
        if (final / "meta.json").exists():
            return ref
        for debris in root.glob(f".{final.name}.tmp-*"):  # a build that crashed (we hold the lock)
            shutil.rmtree(debris, ignore_errors=True)
        try:
            _build_image_snapshot(rt, config, ref, final, boot_timeout)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                failed.write_text(str(exc))
            raise
    failed.unlink(missing_ok=True)
    _prune_stale(root)
    return ref


def discard_image_snapshot(rt: Runtime, ref: str, reason: str) -> None:
    """A restore of this image snapshot failed: remove it and remember the failure, so the
    next ``SmolVM()`` cold-boots instead of failing the same way (retried after a while)."""
    d = image_ref_dir(rt, ref)
    with contextlib.suppress(OSError):
        (d.parent / f".{d.name}.failed").write_text(f"restore failed: {reason}")
    shutil.rmtree(d, ignore_errors=True)


def _prune_stale(root: Path) -> None:
    """Drop image snapshots an older SmolVM wrote (another format never matches a key)."""
    for d in root.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            fmt = json.loads((d / "meta.json").read_text()).get("format")
        except (OSError, ValueError):
            continue
        if fmt != SNAPSHOT_FORMAT:
            shutil.rmtree(d, ignore_errors=True)


def _recently_failed(final: Path) -> bool:
    try:
        return time.time() - (final.parent / f".{final.name}.failed").stat().st_mtime < FAILURE_TTL
    except OSError:
        return False


def _build_image_snapshot(rt: Runtime, config: VMConfig, ref: str, final: Path, boot_timeout: float) -> None:
    t0 = time.monotonic()
    tmpl = config.model_copy(
        update={
            "vm_id": f"tmpl-{secrets.token_hex(4)}",
            "env_vars": {},
            "port_forwards": {},
            "comm_channel": "auto",
            "retain_disk_on_delete": False,
        }
    )
    info = rt.create(tmpl)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rt.boot(info.vm_id, boot_timeout=boot_timeout)
        t = rt.transport(info.vm_id, "agent")
        try:
            # Warm the guest page cache for what every first command touches, and stop the
            # SSH server: clones start their own with their own key (no foreground kill).
            t.exec(ExecRequest("true", "login", 30))
            res = t.exec(ExecRequest(STOP_SSHD, "raw", 30))
            if not res.ok:
                raise SnapshotError(f"stopping the template's SSH server failed: {res.stderr.strip()}")
        finally:
            t.close()  # the agent must be idle, between host sessions, when frozen
        time.sleep(0.05)
        tmp.mkdir(mode=0o700)
        meta = save_vm_state(rt, rt.state.get_vm(info.vm_id), tmp)
        if meta["memory"] != "file":
            log.info("image snapshot %s keeps RAM in its state stream (no shared memory)", ref)
        meta.update(
            complete=True,
            name=ref,
            config=encode_config(config),
            sshd="stopped",
            build_seconds=round(time.monotonic() - t0, 2),
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)
        log.info("image snapshot %s ready in %.1f s", ref, time.monotonic() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(SmolVMError):
            rt.delete(info.vm_id)


def prune_image_snapshots(image_dir: Path, keep: set[str] | None = None) -> list[str]:
    """Remove image snapshots under ``image_dir/*/snapshots`` except ``keep`` keys."""
    removed = []
    for d in image_dir.glob("*/snapshots/*"):
        if d.is_dir() and not d.name.startswith(".") and d.name not in (keep or set()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def build_default_snapshot(data_dir: Path | None = None, image_dir: Path | None = None) -> str | None:
    """After a build of the default image (in ``image_dir``): its boot snapshot, when the
    image lives where VMs of ``data_dir`` look for it. A failure only costs speed (warned;
    the next ``SmolVM()`` retries)."""
    if not snapshot_boot_enabled():
        return None
    try:
        with Runtime(data_dir) as rt:
            if image_dir is not None and Path(image_dir).resolve() != rt.image_dir:
                return None  # built elsewhere than where VMs look for images
            return ensure_image_snapshot(rt)
    except (SmolVMError, OSError) as exc:
        log.warning(
            "default image built, but its boot snapshot failed (cold boots until the "
            "next SmolVM() retries): %s",
            exc,
        )
        return None
