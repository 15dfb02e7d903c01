"""``Fleet``: SmolVM sandboxes across a Ray cluster (see :mod:`smolvm.fleet`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from smolvm.callbacks import Callback, RunContext, run_pre_hooks, run_with_callbacks
from smolvm.exceptions import SandboxLostError, SmolVMError, SnapshotNotFoundError, ValidationError
from smolvm.fleet.actors import HOST_PREFIX, NAMESPACE, SandboxActor, SandboxHost
from smolvm.types import CommandResult

T = TypeVar("T")
RESOURCE = "smolvm"


def _call(sandbox: FleetSandbox, ref: Any, timeout: float | None = None) -> Any:
    """``ray.get`` with Ray's failures mapped: the actor or its node gone -> SandboxLostError;
    a SmolVMError raised in the sandbox comes back as itself."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayActorError as exc:
        raise SandboxLostError(
            f"sandbox {sandbox.vm_id or '(starting)'} on node {sandbox.node_id or '?'} was lost: "
            f"{str(exc).splitlines()[0][:300]}",
            {"vm_id": sandbox.vm_id, "node_id": sandbox.node_id},
        ) from exc
    except RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SmolVMError):
            raise cause from None
        raise


class FleetFiles:
    """``sandbox.files`` of a fleet sandbox: the :class:`smolvm.files.Files` methods, run
    on the sandbox's node (no ``watch``: events do not cross the cluster)."""

    def __init__(self, sandbox: FleetSandbox) -> None:
        self._sb = sandbox

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op not in ("read", "read_text", "write", "list", "exists", "remove", "make_dir", "rename"):
            raise AttributeError(op)
        return lambda *a, **kw: _call(self._sb, self._sb.actor.files.remote(op, a, kw))


class FleetProcess:
    """A background command in a fleet sandbox (``wait``, ``kill``, ``is_running``)."""

    def __init__(self, sandbox: FleetSandbox, ref: int, pid: int | None) -> None:
        self._sb, self._ref, self.pid = sandbox, ref, pid

    def wait(self, timeout: float | None = None) -> CommandResult:
        """The result once it exits (``timeout`` seconds; None: wait)."""
        return _call(self._sb, self._sb.actor.proc.remote(self._ref, "wait", timeout))

    def kill(self, signal: int = 9) -> None:
        _call(self._sb, self._sb.actor.proc.remote(self._ref, "kill", signal))

    def is_running(self) -> bool:
        return bool(_call(self._sb, self._sb.actor.proc.remote(self._ref, "is_running")))


class FleetSandbox:
    """A sandbox Ray placed on some node (``with fleet.sandbox() as sb:``). Calls block the
    caller; callbacks run here, on the caller's side, before the command leaves."""

    def __init__(self, fleet: Fleet, actor: Any, callbacks: Sequence[Callback]) -> None:
        self.fleet, self.actor, self.callbacks = fleet, actor, list(callbacks)
        self.vm_id: str | None = None
        self.node_id: str | None = None
        self.vm_id, self.node_id = _call(self, actor.info.remote())
        self.files = FleetFiles(self)

    def run(self, command: str, timeout: float | None = 30, shell: str = "login", **kw: Any) -> CommandResult:
        """Like :meth:`smolvm.SmolVM.run` (``timeout`` in seconds)."""
        ctx = RunContext(self.vm_id or "", command, shell, timeout, env=kw.get("env"), cwd=kw.get("cwd"))
        args = {"timeout": timeout, "shell": shell, **kw}
        return run_with_callbacks(
            self.callbacks, ctx, lambda: _call(self, self.actor.run.remote(command, args))
        )

    def spawn(self, command: str, **kw: Any) -> FleetProcess:
        """Like :meth:`smolvm.SmolVM.spawn` (output callbacks cannot cross the cluster)."""
        run_pre_hooks(self.callbacks, RunContext(self.vm_id or "", command, kw.get("shell", "login"), 0))
        ref, pid = _call(self, self.actor.spawn.remote(command, kw))
        return FleetProcess(self, ref, pid)

    def upload_file(self, local_path: str | Path, guest_path: str, mode: int | None = None) -> None:
        """Copy a file from this machine into the sandbox."""
        p = Path(local_path).expanduser()
        if not p.is_file():
            raise ValidationError(f"local file does not exist: {p}", field="local_path")
        self.files.write(guest_path, p.read_bytes(), mode if mode is not None else p.stat().st_mode & 0o777)

    def download_file(self, guest_path: str, local_path: str | Path) -> None:
        """Copy a file from the sandbox to this machine."""
        Path(local_path).expanduser().write_bytes(self.files.read(guest_path))

    def snapshot(self, name: str) -> str:
        """A fleet-wide snapshot of this sandbox: sandboxes on any node can start from it."""
        return self.fleet._register_snapshot(self, name)

    def delete(self) -> None:
        """Remove the sandbox (idempotent); its capacity returns to the node."""
        if self.actor is None:
            return
        try:
            _call(self, self.actor.delete.remote(), timeout=120)
        except SandboxLostError:
            pass  # gone already: nothing left to delete on a dead node
        finally:
            ray.kill(self.actor)
            self.actor = None

    def __enter__(self) -> FleetSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"FleetSandbox(vm_id={self.vm_id!r}, node_id={self.node_id!r})"


class Fleet:
    """Sandboxes spread over a Ray cluster.

    Args:
        address: the cluster to join (``"auto"``, ``"ray://..."`` or ``host:port``); None
            joins the one this process already initialised, else ``RAY_ADDRESS``, else
            starts a local one-node cluster advertising ``smolvm`` = ``per_node`` (default 4).
        per_node: sandboxes each node runs at most; None: each node's ``smolvm`` resource.
            Nodes are expected to advertise the same amount (``ray start
            --resources='{"smolvm": 8}'``).
        pool_size: warm-pool VMs each node keeps ready.
        snapshot_dir: a directory every node mounts: fleet snapshots are stored there;
            None: they travel through Ray's object store.
        callbacks: callbacks of every sandbox, run on this side.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        per_node: int | None = None,
        pool_size: int = 0,
        snapshot_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if per_node is not None and (not isinstance(per_node, int) or per_node < 1):
            raise ValidationError(f"per_node must be an int >= 1, got {per_node!r}", field="per_node")
        if not ray.is_initialized():
            if address is None:
                ray.init(resources={RESOURCE: per_node or 4}, namespace=NAMESPACE, include_dashboard=False)
            else:
                ray.init(address=address, namespace=NAMESPACE)
        self.per_node, self.pool_size = per_node, pool_size
        self.snapshot_dir = str(Path(snapshot_dir).resolve()) if snapshot_dir else None
        self.callbacks = list(callbacks)
        self._hosts: dict[str, Any] = {}
        self._snapshots: dict[str, list[Any]] = {}  # name -> [ObjectRef of its pack]
        self._sandboxes: list[FleetSandbox] = []
        self.refresh()
        if not self._hosts:
            raise ValidationError(
                'no node of this Ray cluster advertises the "smolvm" resource: start nodes with '
                "`ray start --resources='{\"smolvm\": 8}'`",
                field="address",
            )

    # ------------------------------------------------------------------ nodes
    def _smolvm_nodes(self) -> dict[str, float]:
        return {
            n["NodeID"]: n["Resources"][RESOURCE]
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get(RESOURCE, 0) > 0
        }

    def refresh(self) -> dict[str, float]:
        """Start a ``SandboxHost`` on every node that joined (it reconciles that node's
        data dir first) and forget nodes that left; returns node id -> ``smolvm`` units."""
        nodes = self._smolvm_nodes()
        for nid in list(self._hosts):
            if nid not in nodes:
                del self._hosts[nid]
        new = {}
        for nid, cap in nodes.items():
            if nid in self._hosts:
                continue
            new[nid] = SandboxHost.options(  # type: ignore[attr-defined]
                name=HOST_PREFIX + nid,
                namespace=NAMESPACE,
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
            ).remote(self.pool_size, cap)
        for nid, h in new.items():
            ray.get(h.info.remote(), timeout=600)  # ready: reconciled, image built
            self._hosts[nid] = h
        return nodes

    def nodes(self) -> list[dict[str, Any]]:
        """Per node: ``node_id``, ``capacity`` (sandboxes), ``running``, ``pool_ready``,
        ``pool_size``, ``data_dir``."""
        self.refresh()
        out = []
        for h in self._hosts.values():
            try:
                info = ray.get(h.info.remote(), timeout=30)
            except RayError:
                continue  # died since refresh
            if self.per_node:
                info["capacity"] = min(info["capacity"], self.per_node)
            out.append(info)
        return sorted(out, key=lambda i: i["node_id"])

    def _units(self, nodes: dict[str, float]) -> float:
        if not self.per_node:
            return 1.0
        smallest = min(nodes.values(), default=1.0)
        return max(smallest / self.per_node, 0.0001)

    # ------------------------------------------------------------------ sandboxes
    def sandbox(self, *, snapshot: str | None = None, **smolvm_kwargs: Any) -> FleetSandbox:
        """A running sandbox on a node with free capacity (waits for one). Arguments as for
        :class:`smolvm.SmolVM`; ``snapshot`` starts it from a fleet snapshot."""
        if snapshot is not None and snapshot not in self._snapshots and self.snapshot_dir is None:
            raise SnapshotNotFoundError(
                f"no fleet snapshot named {snapshot!r} (sandbox.snapshot(name) makes one)"
            )
        units = self._units(self.refresh())  # one cluster query per sandbox
        actor = SandboxActor.options(resources={RESOURCE: units}).remote(  # type: ignore[attr-defined]
            smolvm_kwargs, snapshot, self._snapshots.get(snapshot or ""), self.snapshot_dir
        )
        sb = FleetSandbox(self, actor, self.callbacks)
        self._sandboxes.append(sb)
        return sb

    def _register_snapshot(self, sb: FleetSandbox, name: str) -> str:
        ref = sb.actor.snapshot.remote(name, self.snapshot_dir)
        _call(sb, ref)  # done (and readable) before anyone starts from it
        if self.snapshot_dir is None:
            self._snapshots[name] = [ref]  # this process owns the pack in the object store
        return name

    def map(
        self,
        commands_or_fn: Sequence[str] | Callable[[FleetSandbox, T], Any],
        items: Sequence[T] | None = None,
        *,
        snapshot: str | None = None,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        **smolvm_kwargs: Any,
    ) -> list[Any]:
        """Each command (or ``fn(sandbox, item)`` for each item) in a fresh sandbox, deleted
        afterwards; results in input order. ``concurrency``: sandboxes at once (default: the
        fleet's capacity). With ``return_exceptions`` an error is returned in its item's
        place (a lost node's items get ``SandboxLostError``); else the first is raised after
        all finished."""
        fn: Callable[[FleetSandbox, Any], Any]
        work: list[Any]
        if callable(commands_or_fn):
            if items is None:
                raise ValidationError("map(fn, items): items are missing", field="items")
            fn, work = commands_or_fn, list(items)
        else:
            fn, work = (lambda sb, cmd: sb.run(cmd, timeout=None)), list(commands_or_fn)

        def one(item: Any) -> Any:
            with self.sandbox(snapshot=snapshot, **smolvm_kwargs) as sb:
                return fn(sb, item)

        width = concurrency or max(1, int(sum(n["capacity"] for n in self.nodes())))
        with ThreadPoolExecutor(max_workers=min(width, max(1, len(work)))) as ex:
            futures = [ex.submit(one, item) for item in work]
        results: list[Any] = []
        for f in futures:
            exc = f.exception()
            if exc is not None and not return_exceptions:
                raise exc
            results.append(exc if exc is not None else f.result())
        return results

    def close(self) -> None:
        """Delete this fleet's sandboxes and stop the node hosts it started."""
        for sb in self._sandboxes:
            try:
                sb.delete()
            except SmolVMError:
                pass
        self._sandboxes.clear()
        for h in self._hosts.values():
            try:
                ray.get(h.close.remote(), timeout=60)
            except RayError:
                pass
            ray.kill(h)
        self._hosts.clear()
        self._snapshots.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
