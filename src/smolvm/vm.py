"""``SmolVMManager``: the public, low-level lifecycle API over the SQLite state store.

It composes the layers below: :mod:`smolvm.runtime` (create / boot / halt / purge),
:mod:`smolvm.snapshots` (save, restore, image snapshots) and :mod:`smolvm.pools`. Any
process can reconnect to a VM through the state store (``SmolVMManager.from_id``).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from smolvm import pools, snapshots
from smolvm.exceptions import VMNotFoundError
from smolvm.runtime import BOOT_TIMEOUT, Runtime, lifetime, ports, resources
from smolvm.snapshots import SnapshotInfo
from smolvm.transports.base import Transport
from smolvm.types import VMConfig, VMInfo


def snapshot_name() -> str:
    """A generated snapshot name (``snap-<time>-<random>``), for snapshots taken unnamed."""
    return f"snap-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class SmolVMManager(Runtime):
    """Creates, starts, stops and deletes microVMs; state lives in ``data_dir/state.db``.

    Args:
        data_dir: state database and VM files (default: ``$SMOLVM_DATA_DIR``,
            ``~/.local/state/smolvm``, ``/var/lib/smolvm``: the first writable).
        socket_dir: VM sockets (default ``/tmp``).
        backend: "firecracker", "qemu" or "auto" (default; see ``resolve_backend``).
    """

    @classmethod
    def from_id(cls, vm_id: str, **kwargs: Any) -> SmolVMManager:
        """A manager whose state store holds ``vm_id`` (raises ``VMNotFoundError``)."""
        mgr = cls(**kwargs)
        if not mgr.state.vm_exists(vm_id):
            mgr.close()
            raise VMNotFoundError(vm_id)
        return mgr

    def __enter__(self) -> SmolVMManager:
        return self

    # ------------------------------------------------------------------ lifecycle
    def start(self, vm_id: str, boot_timeout: float = BOOT_TIMEOUT, *, keep_channel: bool = False) -> VMInfo:
        """Boot a CREATED or STOPPED VM and wait (``boot_timeout`` seconds) until it is ready.

        A VM created from a snapshot is restored instead; ``keep_channel`` keeps the agent
        connection that restore opened for this manager's next ``transport()`` call (QEMU
        serves one agent client per port, so only a caller that will use it should)."""
        rec = self.state.get_vm(vm_id)
        if rec.snapshot and rec.started_at is None:
            info = snapshots.restore_vm(self, vm_id, boot_timeout=boot_timeout)
            if not keep_channel:
                self.drop_handoff(vm_id)
            return info
        return self.boot(vm_id, boot_timeout)

    def reconcile(self) -> list[str]:
        """Mark VMs whose VMM died as ERROR (returned) and remove what crashes left behind:
        VMs of owner processes that died with their watchdog, pool VMs of dead owners,
        half-written snapshots, resources of vanished VMs."""
        lifetime.reap_dead_owners(self)
        stale = self.mark_dead()
        pools.reap_orphans(self)
        snapshots.gc_incomplete(self)
        resources.remove_orphans(self.state)
        return stale

    # ------------------------------------------------------------------ ports
    def expose_local(self, vm_id: str, guest_port: int, host_port: int | None = None) -> int:
        """Forward ``127.0.0.1:host_port`` (free port when None) to the guest's TCP
        ``guest_port``; live on a running VM, kept across restarts. Returns the host port."""
        return ports.expose(self, vm_id, guest_port, host_port)

    def unexpose_local(self, vm_id: str, host_port: int) -> None:
        ports.unexpose(self, vm_id, host_port)

    def exposed_ports(self, vm_id: str) -> dict[int, int]:
        return ports.exposed(self, vm_id)

    # ------------------------------------------------------------------ snapshots & pools
    def snapshot(
        self, vm_id: str, name: str | None = None, *, resume: bool = True, transport: Transport | None = None
    ) -> SnapshotInfo:
        """Snapshot a running/paused VM (memory, devices, disk) as ``name`` (generated when
        None); the VM pauses ~0.1-0.3 s, then resumes unless ``resume=False``."""
        return snapshots.create_snapshot(
            self, vm_id, name or snapshot_name(), resume=resume, transport=transport or self.handed_off(vm_id)
        )

    def restore_snapshot(
        self, name: str, *, vm_id: str | None = None, boot_timeout: float = BOOT_TIMEOUT, **overrides: Any
    ) -> VMInfo:
        """A new running VM restored from snapshot ``name`` (its own disk overlay, ports,
        identity). ``overrides``: env_vars, port_forwards, comm_channel, retain_disk_on_delete."""
        info = snapshots.create_clone(self, name, vm_id=vm_id, **overrides)
        try:
            return self.start(info.vm_id, boot_timeout=boot_timeout)
        except BaseException:
            self.delete(info.vm_id)
            raise

    def list_snapshots(self) -> list[SnapshotInfo]:
        return snapshots.list_snapshots(self)

    def get_snapshot(self, name: str) -> SnapshotInfo:
        return snapshots.get_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        snapshots.delete_snapshot(self, name)

    def pool(
        self, size: int = 1, config: VMConfig | None = None, *, snapshot: str | None = None, **kw: Any
    ) -> pools.WarmPool:
        """A :class:`smolvm.WarmPool` of ``size`` paused, restored VMs (refilled in the
        background). Close it (or use ``with``) to drain it."""
        return pools.WarmPool(
            size, config, snapshot=snapshot, data_dir=self.data_dir, socket_dir=self.socket_dir, **kw
        )


__all__ = ["SmolVMManager"]
