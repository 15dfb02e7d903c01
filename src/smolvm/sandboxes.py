"""How ``SmolVM()`` gets its VM: a warm-pool hand-out, else a clone of the image's boot
snapshot, else a cold boot. Owned VMs are created inside ``lifetime.owning``."""

from __future__ import annotations

import logging

from smolvm import pools, snapshots
from smolvm.exceptions import BackendError, SmolVMError, SnapshotError
from smolvm.runtime import lifetime
from smolvm.types import VMConfig, VMInfo
from smolvm.vm import SmolVMManager

log = logging.getLogger(__name__)


def create_sandbox(
    mgr: SmolVMManager, config: VMConfig, pool: pools.WarmPool | None, cold_boot: bool
) -> VMInfo:
    """A warm-pool VM, else a clone of the image's boot snapshot, else a cold-boot VM."""
    if not cold_boot:
        p = pool if pool is not None else pools.default_pool(mgr.data_dir, mgr.socket_dir)
        if p is not None and not p.matches(config):
            p = None
        if p is not None:
            info = p.acquire(mgr, env_vars=config.env_vars or None)
            if info is not None:
                return info
        ref = snapshots.default_snapshot_for(mgr, mgr.resolve_image(config))
        if ref is None and p is not None:
            try:  # the pool is empty: restore from its snapshot directly
                ref = snapshots.get_snapshot(mgr, p.source).name
            except SmolVMError:
                ref = None
        if ref is not None:
            try:
                return snapshots.create_clone(
                    mgr,
                    ref,
                    vm_id=config.vm_id,
                    env_vars=config.env_vars,
                    port_forwards=config.port_forwards,
                    comm_channel=config.comm_channel,
                    retain_disk_on_delete=config.retain_disk_on_delete,
                    internet_settings=config.internet_settings,
                )
            except SnapshotError as exc:  # stale or damaged: a cold boot still works
                log.warning("cannot restore %s (%s); cold boot instead", ref, exc)
    return mgr.create(config)


def cold_boot_instead(
    mgr: SmolVMManager, info: VMInfo, exc: SmolVMError, owned: bool, boot_timeout: float
) -> VMInfo:
    """A sandbox whose restore from its image's boot snapshot failed: cold-boot it instead
    (same id and settings). QEMU refusing the state or missing files mean the boot snapshot
    is broken: drop it (retried later); a timeout may be load."""
    ref = info.snapshot or ""
    log.warning("restoring %s failed (%s); cold boot instead", ref, exc)
    if isinstance(exc, (BackendError, SnapshotError)):
        snapshots.discard_image_snapshot(mgr, ref, str(exc))
    # The image's own config (boot files resolved afresh), not the snapshot's paths.
    config = info.config.model_copy(update={"kernel_path": None, "rootfs_path": None, "initrd_path": None})
    mgr.delete(info.vm_id)
    with lifetime.owning(mgr, enabled=owned):
        mgr.create(VMConfig(**config.model_dump()))
    return mgr.start(info.vm_id, boot_timeout=boot_timeout)
