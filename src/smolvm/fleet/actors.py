"""The Ray actors of a fleet. Ray places them, watches their nodes and moves data; SmolVM
runs the sandboxes.

- ``SandboxHost``: one per node that advertises the ``smolvm`` resource, pinned there. It
  owns the node's data dir (``SMOLVM_DATA_DIR`` of that node's workers, else the default):
  reconciles it when it starts (a node that comes back cleans up after its last life),
  keeps the node's warm pool, imports fleet snapshots, and reports the node's state.
- ``SandboxActor``: one per sandbox, asking Ray for one unit of ``smolvm``, so Ray puts it
  on a node with free capacity. Its ``SmolVM`` belongs to the actor's process: if the
  process or its node dies, the VM goes with it (lifetimes), and callers get Ray's actor
  error, which :mod:`smolvm.fleet` turns into ``SandboxLostError``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ray

from smolvm.exceptions import SnapshotNotFoundError
from smolvm.images import ImageBuilder
from smolvm.paths import resolve_data_dir
from smolvm.pools import WarmPool
from smolvm.smolvm import SmolVM
from smolvm.snapshots.transfer import SnapshotPack, pack_snapshot, read_pack, unpack_snapshot, write_pack
from smolvm.transports.base import ProcessHandle
from smolvm.types import CommandResult
from smolvm.vm import SmolVMManager

#: Actor names are per node; the namespace keeps them apart from the user's actors.
NAMESPACE = "smolvm"
HOST_PREFIX = "smolvm-host-"


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, max_restarts=0)
class SandboxHost:
    """The SmolVM side of one node (see the module docs)."""

    def __init__(self, pool_size: int = 0, capacity: float = 0.0) -> None:
        self.node_id = node_id()
        self.data_dir = resolve_data_dir(None)
        self.capacity = capacity
        self.manager = SmolVMManager(data_dir=self.data_dir)
        # Whatever a previous life of this node left (VMs, TAPs, rules, ports) goes now.
        self.reconciled = self.manager.reconcile()
        ImageBuilder().ensure_default()
        self.pool: WarmPool | None = None
        if pool_size > 0:
            self.pool = WarmPool(pool_size, data_dir=self.data_dir)
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        running = [v for v in self.manager.list_vms() if v.status.value == "running"]
        return {
            "node_id": self.node_id,
            "data_dir": str(self.data_dir),
            "capacity": self.capacity,
            "running": len(running),  # pool VMs wait paused: not counted
            "pool_ready": self.pool.ready if self.pool else 0,
            "pool_size": self.pool.size if self.pool else 0,
        }

    def ensure_snapshot(self, name: str, pack: list[Any] | None, shared_dir: str | None) -> str:
        """Make fleet snapshot ``name`` available here; returns its local name."""
        with self._lock:  # two sandboxes starting from it at once import it once
            try:
                self.manager.get_snapshot(name)
                return name
            except SnapshotNotFoundError:
                pass
            if shared_dir is not None:
                data: SnapshotPack = read_pack(Path(shared_dir), name)
            elif pack:
                data = ray.get(pack[0])
            else:
                raise SnapshotNotFoundError(f"no fleet snapshot named {name!r}")
            unpack_snapshot(self.manager, data)
            return name

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.manager.close()


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class SandboxActor:
    """One sandbox; every method runs in the actor's process on its node."""

    def __init__(self, kwargs: dict[str, Any], snapshot: str | None, pack: list[Any] | None,
                 shared_dir: str | None) -> None:  # fmt: skip
        self.node_id = node_id()
        self.vm: SmolVM
        host = ray.get_actor(HOST_PREFIX + self.node_id, namespace=NAMESPACE)
        if snapshot is not None:
            ray.get(host.ensure_snapshot.remote(snapshot, pack, shared_dir))
            self.vm = SmolVM.from_snapshot(snapshot, **kwargs)
        else:
            host_info: Any = ray.get(host.info.remote())
            if "pool" not in kwargs and host_info["pool_size"] > 0:
                # The host's pool fills the node's state store; a size-0 view of the same
                # pool claims from it (and never drains the host's VMs: not its owner).
                kwargs = {**kwargs, "pool": WarmPool(0, start=False)}
            self.vm = SmolVM(**kwargs)
        self.vm.start()
        self._procs: dict[int, ProcessHandle] = {}
        self._next: int = 0

    def info(self) -> tuple[str, str]:
        return self.vm.vm_id, self.node_id

    def run(self, command: str, kw: dict[str, Any]) -> CommandResult:
        return self.vm.run(command, **kw)

    def spawn(self, command: str, kw: dict[str, Any]) -> tuple[int, int | None]:
        self._next += 1
        self._procs[self._next] = h = self.vm.spawn(command, **kw)
        return self._next, h.pid

    def proc(self, ref: int, op: str, arg: Any = None) -> Any:
        h = self._procs[ref]
        if op == "wait":
            out = h.wait(arg)
            del self._procs[ref]
            return out
        if op == "kill":
            return h.kill(arg or 9)
        if op == "is_running":
            return h.is_running()
        if op == "output":
            return h.stdout, h.stderr
        raise ValueError(op)

    def files(self, op: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if op not in ("read", "read_text", "write", "list", "exists", "remove", "make_dir", "rename"):
            raise ValueError(f"unknown files operation {op!r}")
        return getattr(self.vm.files, op)(*args, **kw)

    def snapshot(self, name: str, shared_dir: str | None) -> SnapshotPack | None:
        """Snapshot this sandbox; returns the pack (None: written to ``shared_dir``)."""
        self.vm.snapshot(name)
        pack = pack_snapshot(self.vm.manager, name)
        if shared_dir is None:
            return pack
        write_pack(pack, Path(shared_dir))
        return None

    def delete(self) -> None:
        self.vm.delete()
        self.vm.close()


__all__ = ["SandboxHost", "SandboxActor", "NAMESPACE", "HOST_PREFIX"]
