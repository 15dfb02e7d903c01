"""Warm pools: paused, already-restored sandboxes handed out in milliseconds.

    from smolvm import SmolVM, WarmPool

    with WarmPool(size=2) as pool:          # refills in the background
        with SmolVM(pool=pool) as vm:       # hand-out: resume + clock/RNG reset
            vm.run("echo hi")

Or set ``SMOLVM_POOL_SIZE=N``: then ``SmolVM()`` (default config) uses a process-wide pool.

A pool VM is an ordinary VM row (status ``paused``, ``pool`` = the pool key), visible in
``list_vms()``. Hand-out is one atomic state transition (``BEGIN IMMEDIATE`` … ``UPDATE``),
so two processes never get the same VM; the refill thread then replaces it. Refills run
one restore at a time, at a lower CPU priority, so they never starve a 2-core machine.
Pool VMs carry their owner (the process running the pool); when it dies without draining,
``reconcile()`` or the next pool removes them.

Each pool VM is fully prepared while it waits: restored, given its own identity (hostname,
SSH host key, ...), its translation cache warmed by a first command, then paused. Handing
it out only resumes it and resets its clock and RNG.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from smolvm.envflags import env_int
from smolvm.exceptions import SmolVMError, ValidationError
from smolvm.paths import default_socket_dir, resolve_data_dir
from smolvm.runtime import Runtime, lifetime
from smolvm.runtime.channels import agent_transport
from smolvm.runtime.identity import put_env_file
from smolvm.snapshots import (
    IMAGE_REF_PREFIX,
    create_clone,
    ensure_image_snapshot,
    get_snapshot,
    image_snapshot_ref,
    restore_vm,
)
from smolvm.state.records import VMRecord
from smolvm.transports.base import ExecRequest
from smolvm.types import VMConfig, VMInfo, VMState

log = logging.getLogger(__name__)

#: Config fields a pool VM is made with; a request must agree on all of them to use it.
_MATCH_FIELDS = (
    "vcpu_count",
    "mem_size_mib",
    "disk_size_mib",
    "kernel_path",
    "rootfs_path",
    "initrd_path",
    "boot_args",
    "network",
    "comm_channel",
    "port_forwards",
    "workspace_mounts",
    "internet_settings",
)


def reap_orphans(rt: Runtime) -> list[str]:
    """Delete pool VMs whose owning process is gone (they would otherwise sit paused forever)."""
    gone = []
    for rec in rt.state.pool_vms():
        if lifetime.alive(rec.pool_owner):
            continue
        if rec.status is VMState.PAUSED and not rt.state.claim_vm(rec.vm_id):
            continue  # just handed out by someone else
        try:
            rt.delete(rec.vm_id)
            gone.append(rec.vm_id)
        except SmolVMError as exc:
            log.warning("could not remove orphaned pool VM %s: %s", rec.vm_id, exc)
    return gone


def _renice(pid: int | None, value: int) -> None:
    """Set every thread of ``pid`` to niceness ``value`` (lowering needs privileges: best effort)."""
    if not pid:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except OSError:
            return


class _Background:
    """Run ``fn`` on a thread; ``result()`` re-raises its exception."""

    def __init__(self, fn: Any) -> None:
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:
            self._exc = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._exc is not None:
            raise self._exc


class WarmPool:
    """Keeps ``size`` paused, restored VMs of one config (or one snapshot) ready.

    Args:
        size: VMs to keep ready (0 disables refilling; the pool then only drains).
        config: the sandbox config (default: ``VMConfig()``, the default image). Its VMs
            are restored from that config's image snapshot (created on first use).
        snapshot: restore from this user snapshot instead (``config`` is then ignored).
        data_dir / socket_dir: as for :class:`smolvm.SmolVMManager`.
        start: start refilling now (else call :meth:`start`).
        boot_timeout: seconds one restore may take.
    """

    def __init__(
        self,
        size: int = 1,
        config: VMConfig | None = None,
        *,
        snapshot: str | None = None,
        data_dir: Path | None = None,
        socket_dir: Path | None = None,
        start: bool = True,
        boot_timeout: float = 60.0,
    ) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValidationError(f"pool size must be an integer >= 0, got {size!r}", field="size")
        self.size = size
        self.boot_timeout = boot_timeout
        self.runtime = Runtime(data_dir=data_dir, socket_dir=socket_dir)
        self.owner = lifetime.ensure_watchdog(self.runtime)  # its idle VMs end with this process
        self._default_image = False
        if snapshot is not None:
            snap = get_snapshot(self.runtime, snapshot)
            self.config = snap.config
            self.source: str = snapshot
        else:
            given = config or VMConfig()
            self.config = self.runtime.resolve_image(given)
            self._default_image = given.kernel_path is None and given.rootfs_path is None
            ref = image_snapshot_ref(self.runtime, self.config)
            if ref is None:
                self.runtime.close()
                raise ValidationError(
                    "this config cannot be pooled: it needs an image with the guest "
                    "agent, the qemu backend and user or no networking",
                    field="config",
                )
            self.source = ref
        digest = hashlib.sha256(
            json.dumps(self._match_view(self.config), sort_keys=True, default=str).encode()
        ).hexdigest()[:10]
        self.key = f"{self.source}#{digest}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.errors: list[str] = []
        #: Restores done by this pool, and hand-outs served (for stats and benchmarks).
        self.filled = 0
        self.handed_out = 0
        reap_orphans(self.runtime)
        atexit.register(self.close)
        if start:
            self.start()

    # ------------------------------------------------------------------ matching
    @staticmethod
    def _match_view(cfg: VMConfig) -> dict[str, Any]:
        return {f: (str(v) if isinstance(v := getattr(cfg, f), Path) else v) for f in _MATCH_FIELDS}

    def matches(self, config: VMConfig | None) -> bool:
        """True when a sandbox for ``config`` may come from this pool (env vars may differ;
        an explicit ``vm_id`` never matches: pool VMs already have theirs)."""
        if config is None:
            config = VMConfig()
        if "vm_id" in config.model_fields_set:
            return False
        if config.kernel_path is None and config.rootfs_path is None and self._default_image:
            # The pool's own default image (resolving it again hashes the guest sources).
            config = config.model_copy(
                update={"kernel_path": self.config.kernel_path, "rootfs_path": self.config.rootfs_path}
            )
        else:
            try:
                config = self.runtime.resolve_image(config)
            except SmolVMError:
                return False
        return self._match_view(config) == self._match_view(self.config)

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self._closed

    def _rows(self) -> list[VMRecord]:
        return self.runtime.state.pool_vms(self.key)

    @property
    def ready(self) -> int:
        """Paused VMs ready to hand out now (any process's)."""
        return sum(1 for r in self._rows() if r.status is VMState.PAUSED)

    def vms(self) -> list[VMInfo]:
        return [r.info() for r in self._rows()]

    def stats(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "size": self.size,
            "ready": self.ready,
            "filled": self.filled,
            "handed_out": self.handed_out,
            "errors": self.errors[-5:],
        }

    def wait_ready(self, n: int | None = None, timeout: float = 120.0) -> bool:
        """Block until ``n`` (default ``size``) VMs are ready; False on timeout."""
        want = self.size if n is None else n
        deadline = time.monotonic() + timeout
        while self.ready < want:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ refill
    def start(self) -> WarmPool:
        with self._lock:
            if self._closed:
                raise SmolVMError("this pool is closed")
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name=f"smolvm-pool-{self.key[-10:]}", daemon=True
                )
                self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            live = [r for r in self._rows() if r.status is not VMState.ERROR]
            for r in self._rows():
                if r.status is VMState.ERROR and r.pool_owner == self.owner:
                    self._discard(r.vm_id)
            if len(live) >= self.size:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._fill_one()
                backoff = 1.0
            except Exception as exc:  # keep refilling; surface the reason in stats()
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log.warning("pool %s: refill failed: %s", self.key, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _fill_one(self) -> None:
        rt = self.runtime
        if self.source.startswith(IMAGE_REF_PREFIX):
            ensure_image_snapshot(rt, self.config, boot_timeout=self.boot_timeout)
        info = create_clone(
            rt,
            self.source,
            env_vars={},
            pool=self.key,
            pool_owner=self.owner,
            port_forwards=self.config.port_forwards,
            comm_channel=self.config.comm_channel,
            internet_settings=self.config.internet_settings,
        )
        vm_id = info.vm_id
        try:
            restore_vm(rt, vm_id, boot_timeout=self.boot_timeout, settle=True)
            t = rt.transport(vm_id, "agent")  # the restore's own connection
            try:
                t.exec(ExecRequest("true", "login", 30))  # warm the translation cache
            finally:
                t.close()
            rec = rt.state.get_vm(vm_id)
            rt.backend_for(rec.backend).pause(rt.spec(rec))
            rt.state.update_vm(vm_id, status=VMState.PAUSED)
        except BaseException:
            self._discard(vm_id)
            raise
        self.filled += 1
        if self._stop.is_set():
            self._discard(vm_id)

    def _discard(self, vm_id: str) -> None:
        try:
            self.runtime.delete(vm_id)
        except SmolVMError as exc:
            log.warning("pool %s: could not delete %s: %s", self.key, vm_id, exc)

    # ------------------------------------------------------------------ hand-out
    def acquire(
        self, runtime: Runtime | None = None, *, env_vars: dict[str, str] | None = None
    ) -> VMInfo | None:
        """Take a ready VM out of the pool and resume it; None when none is ready.

        The VM's agent connection is left in ``runtime`` (default: the pool's) for the
        first ``transport()`` call, so the caller's first command needs no handshake."""
        mgr = runtime or self.runtime
        for _ in range(3):
            vm_id = mgr.state.claim_pool_vm(self.key, owner=lifetime.current_owner())
            if vm_id is None:
                return None
            self._wake.set()
            try:
                return self._hand_out(mgr, vm_id, env_vars)
            except SmolVMError as exc:
                log.warning("pool %s: VM %s failed on hand-out (%s); discarding it", self.key, vm_id, exc)
                try:
                    mgr.delete(vm_id)
                except SmolVMError:
                    pass
        return None

    def _hand_out(self, mgr: Runtime, vm_id: str, env_vars: dict[str, str] | None) -> VMInfo:
        rec = mgr.state.get_vm(vm_id)
        spec = mgr.spec(rec)
        backend = mgr.backend_for(rec.backend)
        _renice(rec.pid, 0)
        t = agent_transport(spec, backend, connect_timeout=10.0)
        # The agent handshake goes out together with QMP "cont": the guest answers it the
        # moment it runs again. Then clock and entropy, both in flight at once.
        hello = _Background(t.ping)
        try:
            backend.resume(spec)
            upd: dict[str, Any] = {"status": VMState.RUNNING}
            if env_vars:
                upd["config"] = rec.config.model_copy(update={"env_vars": dict(env_vars)})
            mgr.state.update_vm(vm_id, **upd)
            hello.result()
            entropy = _Background(lambda: t.add_entropy(os.urandom(64)))
            t.sync_time()
            if env_vars:
                put_env_file(t, env_vars)
            entropy.result()
        except BaseException:
            hello.join()
            t.close()
            raise
        mgr.hand_off(vm_id, t)
        self.handed_out += 1
        return mgr.get(vm_id)

    # ------------------------------------------------------------------ drain
    def drain(self) -> list[str]:
        """Delete this pool's idle VMs (and those of dead owners); returns their ids."""
        gone = []
        for r in self._rows():
            mine = r.pool_owner == self.owner or not lifetime.alive(r.pool_owner)
            if not mine:
                continue
            if r.status is VMState.PAUSED and not self.runtime.state.claim_vm(r.vm_id):
                continue
            self._discard(r.vm_id)
            gone.append(r.vm_id)
        return gone

    def close(self, timeout: float = 60.0) -> None:
        """Stop refilling and drain (idempotent; also runs at interpreter exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        try:
            self.drain()
        finally:
            atexit.unregister(self.close)
            _forget_default(self)
            self.runtime.close()

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WarmPool(size={self.size}, key={self.key!r}, ready={self.ready})"


# ---------------------------------------------------------------------- process-wide pool
_defaults: dict[tuple[str, str], WarmPool] = {}
_defaults_lock = threading.Lock()


def pool_size_from_env() -> int:
    return env_int("SMOLVM_POOL_SIZE", 0, minimum=0)


def default_pool(data_dir: Path | None = None, socket_dir: Path | None = None) -> WarmPool | None:
    """The process-wide pool for the default config when ``SMOLVM_POOL_SIZE`` > 0."""
    size = pool_size_from_env()
    if size <= 0:
        return None
    resolved = resolve_data_dir(data_dir)
    key = (str(resolved), str(Path(socket_dir) if socket_dir else default_socket_dir(resolved)))
    with _defaults_lock:
        p = _defaults.get(key)
        if p is None or p.closed:
            try:
                p = WarmPool(size, data_dir=data_dir, socket_dir=socket_dir)
            except SmolVMError as exc:
                log.warning("SMOLVM_POOL_SIZE=%d ignored: %s", size, exc)
                return None
            _defaults[key] = p
        return p


def _forget_default(pool: WarmPool) -> None:
    with _defaults_lock:
        for k, v in list(_defaults.items()):
            if v is pool:
                del _defaults[k]


__all__ = ["WarmPool", "default_pool", "reap_orphans"]
