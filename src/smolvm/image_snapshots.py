"""Image snapshots: a booted-and-ready snapshot per image and launch configuration, so
``SmolVM()`` restores (~0.3 s) instead of cold-booting (~3 s under TCG).

Kept under ``<image>/snapshots/<key>/``, keyed by the image build and every launch input a
restore needs identical; built once under a file lock (image build hook or first use).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from smolvm.exceptions import (
    SmolVMError,
    SnapshotError,
)
from smolvm.images.builder import DEFAULT_IMAGE, ImageBuilder, artifacts_for_kernel
from smolvm.network.manager import USER_GATEWAY, USER_GUEST_IP
from smolvm.transports.base import ExecRequest
from smolvm.types import NetworkInfo, VMConfig

if TYPE_CHECKING:
    from smolvm.vm import SmolVMManager

from smolvm.snapshots import (
    _FAILURE_TTL,
    _KILL_SSHD,
    IMAGE_REF_PREFIX,
    SNAPSHOT_FORMAT,
    SnapshotInfo,
    _image_ref_dir,
    _launch_facts,
    _save,
    boot_memory,
    create_clone,
    create_snapshot,
    delete_snapshot,
    gc_incomplete,
    get_snapshot,
    list_snapshots,
    push_identity,
    refresh_guest,
    restore_vm,
    shared_memory_available,
    write_qcow2_overlay,
)

log = logging.getLogger("smolvm.snapshots")


# ---------------------------------------------------------------------------- image snapshots
def snapshot_boot_enabled() -> bool:
    return os.environ.get("SMOLVM_SNAPSHOT_BOOT", "1").strip().lower() not in ("0", "no", "false", "off")


def image_snapshot_ref(mgr: SmolVMManager, config: VMConfig) -> str | None:
    """The image-snapshot ref for a resolved ``config``, or None when its VMs cannot be
    restored from one (no agent in the image, not QEMU, TAP networking, ...)."""
    if config.kernel_path is None or config.rootfs_path is None:
        return None
    art = artifacts_for_kernel(config.kernel_path)
    if art is None or not art.has_agent or art.rootfs != Path(config.rootfs_path):
        return None
    if config.initrd_path is not None or config.network == "tap":
        return None
    from smolvm.backends import resolve_backend

    if (resolve_backend(config.backend) if config.backend else mgr.backend) != "qemu":
        return None
    accel = mgr.host.accel().accel
    probe = {"vm_id": "probe", "backend": "qemu", "accelerator": accel,
             "config": config.model_dump(mode="json"), "disk_path": "/nonexistent",
             "network": _probe_net(config.network).model_dump(mode="json")}
    spec = mgr.spec(probe)
    facts = _launch_facts(spec, _probe_net(config.network))
    key_src = {"format": SNAPSHOT_FORMAT, "image": art.manifest.get("local_key"),
               "built_at": art.manifest.get("built_at"), "rootfs": str(art.rootfs),
               "disk_size_mib": config.disk_size_mib, "shared_memory": shared_memory_available(),
               **facts}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    return f"{IMAGE_REF_PREFIX}{art.name}/{key}"


def _probe_net(mode: str) -> NetworkInfo:
    if mode == "none":
        return NetworkInfo(mode="none")
    return NetworkInfo(mode="user", guest_ip=USER_GUEST_IP, gateway_ip=USER_GATEWAY)


def default_snapshot_for(mgr: SmolVMManager, config: VMConfig, *, create: bool = True) -> str | None:
    """The image snapshot ``SmolVM()`` may restore for ``config`` (resolved), creating it on
    first use; None when the config does not match the default one (cold boot)."""
    if not snapshot_boot_enabled():
        return None
    if config.disk_size_mib is not None or config.boot_args != VMConfig.model_fields["boot_args"].default:
        return None
    default = VMConfig()
    if (config.mem_size_mib, config.vcpu_count, config.network) != (
            default.mem_size_mib, default.vcpu_count, default.network):
        return None
    builder_default = mgr.image_dir / DEFAULT_IMAGE
    if Path(config.kernel_path or "").parent != builder_default:
        return None
    ref = image_snapshot_ref(mgr, config)
    if ref is None:
        return None
    if (_image_ref_dir(mgr, ref) / "meta.json").exists():
        return ref
    if not create or _recently_failed(_image_ref_dir(mgr, ref)):
        return None
    try:
        return ensure_image_snapshot(mgr, config)
    except SmolVMError as exc:
        log.warning("no boot snapshot for the default image (cold boot instead): %s", exc)
        return None


def ensure_image_snapshot(mgr: SmolVMManager, config: VMConfig | None = None, *,
                          boot_timeout: float = 60.0) -> str:
    """Create (once, under a lock) the booted-and-ready snapshot of ``config``'s image.

    Boots a template VM, lets it settle, snapshots it and deletes it (~4 s under TCG)."""
    config = mgr._resolve_image(config or VMConfig())
    ref = image_snapshot_ref(mgr, config)
    if ref is None:
        raise SnapshotError("this config cannot be restored from an image snapshot (image without "
                            "agent, non-QEMU backend, custom initrd or TAP networking)")
    final = _image_ref_dir(mgr, ref)
    if (final / "meta.json").exists():
        return ref
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    failed = root / f".{final.name}.failed"
    if _recently_failed(final):
        raise SnapshotError(f"{ref} failed recently ({failed.read_text().strip()[:300]})")
    with _flock(root / f".{final.name}.lock"):
        if (final / "meta.json").exists():
            return ref
        for debris in root.glob(f".{final.name}.tmp-*"):  # a build that crashed (we hold the lock)
            shutil.rmtree(debris, ignore_errors=True)
        try:
            _build_image_snapshot(mgr, config, ref, final, boot_timeout)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                failed.write_text(str(exc))
            raise
    failed.unlink(missing_ok=True)
    _prune_stale(root)
    return ref


def discard_image_snapshot(mgr: SmolVMManager, ref: str, reason: str) -> None:
    """A restore of this image snapshot failed: remove it and remember the failure, so the
    next ``SmolVM()`` cold-boots instead of failing the same way (retried after a while)."""
    d = _image_ref_dir(mgr, ref)
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
        return time.time() - (final.parent / f".{final.name}.failed").stat().st_mtime < _FAILURE_TTL
    except OSError:
        return False


@contextlib.contextmanager
def _flock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_image_snapshot(mgr: SmolVMManager, config: VMConfig, ref: str, final: Path,
                          boot_timeout: float) -> None:
    t0 = time.monotonic()
    tmpl = config.model_copy(update={"vm_id": f"tmpl-{secrets.token_hex(4)}", "env_vars": {},
                                     "port_forwards": {}, "comm_channel": "auto",
                                     "retain_disk_on_delete": False})
    info = mgr.create(tmpl)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mgr.start(info.vm_id, boot_timeout=boot_timeout)
        t = mgr.transport(info.vm_id, "agent")
        try:
            # Warm the guest page cache for what every first command touches, and stop the
            # SSH server: clones start their own with their own key (no foreground kill).
            t.exec(ExecRequest("true", "login", 30))
            res = t.exec(ExecRequest(_KILL_SSHD + "for p in $old; do while kill -0 $p 2>/dev/null; "
                                     "do usleep 2000; done; done; true", "raw", 30))
            if not res.ok:
                raise SnapshotError(f"stopping the template's SSH server failed: {res.stderr.strip()}")
        finally:
            t.close()  # the agent must be idle, between host sessions, when frozen
        time.sleep(0.05)
        tmp.mkdir(mode=0o755)
        row = mgr.state.get_vm(info.vm_id)
        meta = _save(mgr, row, tmp)
        if meta["memory"] != "file":
            log.info("image snapshot %s keeps RAM in its state stream (no shared memory)", ref)
        meta.update(complete=True, name=ref, config=config.model_dump(mode="json"), sshd="stopped",
                    build_seconds=round(time.monotonic() - t0, 2))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)
        log.info("image snapshot %s ready in %.1f s", ref, time.monotonic() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(SmolVMError):
            mgr.delete(info.vm_id)


def prune_image_snapshots(image_dir: Path, keep: set[str] | None = None) -> list[str]:
    """Remove image snapshots under ``image_dir/*/snapshots`` except ``keep`` keys."""
    removed = []
    for d in image_dir.glob("*/snapshots/*"):
        if d.is_dir() and not d.name.startswith(".") and d.name not in (keep or set()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def build_default_snapshot(builder: ImageBuilder) -> str | None:
    """Hook for the image builder: end the default image's build with its boot snapshot."""
    if not snapshot_boot_enabled():
        return None
    from smolvm.vm import SmolVMManager

    try:
        with SmolVMManager() as mgr:
            if mgr.image_dir != builder.cache_dir.resolve():
                return None  # built elsewhere than where VMs look for images
            return ensure_image_snapshot(mgr)
    except (SmolVMError, OSError) as exc:
        log.warning("default image built, but its boot snapshot failed (cold boots until the "
                    "next SmolVM() retries): %s", exc)
        return None


__all__ = [
    "SnapshotInfo", "create_snapshot", "get_snapshot", "list_snapshots", "delete_snapshot", "gc_incomplete",
    "create_clone", "restore_vm", "push_identity", "refresh_guest", "ensure_image_snapshot",
    "default_snapshot_for", "image_snapshot_ref", "write_qcow2_overlay", "boot_memory",
]
