"""``SmolVM``: the one-object API. ``with SmolVM() as vm: vm.run("echo hi")``."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from smolvm import pools, snapshots
from smolvm.callbacks import (
    Callback,
    FileContext,
    RunContext,
    around,
    lifecycle,
    run_pre_hooks,
    run_with_callbacks,
)
from smolvm.endpoints import Endpoints
from smolvm.exceptions import (
    AgentError,
    CommandExecutionUnavailableError,
    CommandFateUnknownError,
    GuestCrashedError,
    OperationTimeoutError,
    SmolVMError,
    TransportError,
    ValidationError,
)
from smolvm.files import Files
from smolvm.guestenv import GuestEnv
from smolvm.idle import IdleTimer, check_args
from smolvm.options import (
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_MAX_OUTPUT_BYTES,
    exec_request,
    sandbox_config,
)
from smolvm.runtime import BOOT_TIMEOUT, STOP_TIMEOUT, lifetime
from smolvm.sandboxes import cold_boot_instead, create_sandbox
from smolvm.snapshots import SnapshotInfo
from smolvm.terminal import PtyHandle
from smolvm.transports.base import (
    ExecRequest,
    OutputCallback,
    ProcessHandle,
    Transport,
    WatchHandle,
    check_size,
)
from smolvm.types import (
    CommandResult,
    InternetSettings,
    Limits,
    VMConfig,
    VMInfo,
    VMState,
    WorkspaceMount,
)
from smolvm.vm import SmolVMManager, snapshot_name

log = logging.getLogger(__name__)
T = TypeVar("T")


class SmolVM(Endpoints, GuestEnv):
    """A sandbox: one microVM plus the channel used to run commands in it.

    ``SmolVM()`` uses the default image; ``SmolVM(config)`` a custom one. The VM is created
    at construction and booted by :meth:`start` (or on entering a ``with`` block).

    How it comes up, fastest first:

    * ``pool=WarmPool(...)`` (or ``SMOLVM_POOL_SIZE=N`` for the default config): a paused,
      already-restored VM is handed out at construction (milliseconds).
    * The config equals the default one: the image's booted-and-ready snapshot is
      restored (~0.3 s under TCG), with its own disk overlay, clock, RNG and identity.
    * Otherwise, or with ``cold_boot=True``: a cold boot (~3-4 s under TCG).

    ``SmolVM.from_snapshot(name)`` restores one of your snapshots (:meth:`snapshot`).

    Sizes are in MiB. Aliases from the public ``smolvm`` API are accepted: ``memory`` (=
    ``mem_size_mib``), ``disk_size`` (= ``disk_size_mib``), ``os`` ("debian", the default
    image, or "alpine", which needs Alpine's mirror), ``comm_channel="vsock"`` (= "agent").
    ``mounts=["./repo:/workspace"]`` shares host directories (read-only with a writable
    overlay inside the VM; ``writable_mounts=True`` or ``"HOST:GUEST:rw"`` writes through).

    Lifetime: the VM belongs to this process and is removed within seconds after it ends,
    even by SIGKILL (a watchdog process does it); ``detached=True`` keeps it until deleted
    (reconnect with :meth:`from_id`). ``idle_timeout=seconds`` pauses it (``idle_action=
    "stop"``: stops it) after that long without a call or a running spawned process; the
    next call resumes it.
    """

    def __init__(
        self,
        config: VMConfig | None = None,
        *,
        mem_size_mib: int | None = None,
        disk_size_mib: int | None = None,
        vcpu_count: int | None = None,
        callbacks: list[Callback] | None = None,
        env_vars: dict[str, str] | None = None,
        data_dir: Path | None = None,
        socket_dir: Path | None = None,
        backend: str | None = None,
        comm_channel: str | None = None,
        manager: SmolVMManager | None = None,
        pool: pools.WarmPool | None = None,
        cold_boot: bool = False,
        memory: int | None = None,
        disk_size: int | None = None,
        os: str | None = None,
        mounts: Sequence[str | WorkspaceMount] | None = None,
        writable_mounts: bool = False,
        internet_settings: InternetSettings | dict[str, Any] | None = None,
        detached: bool = False,
        idle_timeout: float | None = None,
        idle_action: str = "pause",
        _vm_id: str | None = None,
    ) -> None:
        check_args(idle_timeout, idle_action)
        self._callbacks: list[Callback] = []
        for cb in callbacks or []:
            self.add_callback(cb)
        self._own_manager = manager is None
        if manager is None and pool is not None and data_dir is None and socket_dir is None:
            # The pool's open state store is shared: a hand-out opens no database.
            rt = pool.runtime
            manager = SmolVMManager(
                data_dir=rt.data_dir, socket_dir=rt.socket_dir, backend=backend, state=rt.state
            )
        self._manager = manager or SmolVMManager(data_dir=data_dir, socket_dir=socket_dir, backend=backend)
        self._transport: Transport | None = None
        self._tlock = threading.Lock()
        self._closed = False
        self._resume_on_start = True
        self._detached = detached
        self._idle: IdleTimer | None = None
        if _vm_id is not None:  # reconnect (from_id)
            self._owned = False
            self._info = self._manager.get(_vm_id)
            self._watch_idle(idle_timeout, idle_action)
            return
        config = sandbox_config(
            config,
            self._manager.image_dir,
            mem_size_mib=mem_size_mib,
            memory=memory,
            disk_size_mib=disk_size_mib,
            disk_size=disk_size,
            vcpu_count=vcpu_count,
            env_vars=env_vars,
            comm_channel=comm_channel,
            os=os,
            mounts=mounts,
            writable_mounts=writable_mounts,
            internet_settings=internet_settings,
        )
        self._owned = True
        with lifetime.owning(self._manager, enabled=not detached):
            self._info = create_sandbox(self._manager, config, pool, cold_boot)
        self._watch_idle(idle_timeout, idle_action)

    def _watch_idle(self, timeout: float | None, action: str) -> None:
        if timeout:
            self._idle = IdleTimer(timeout, action, self._idle_sleep, self._idle_wake)

    # ------------------------------------------------------------------ reconnect
    @classmethod
    def from_id(cls, vm_id: str, **kwargs: Any) -> SmolVM:
        """Attach to an existing VM (any process). On ``with`` exit it is stopped, not deleted."""
        callbacks = kwargs.pop("callbacks", None)
        mgr = SmolVMManager.from_id(vm_id, **kwargs)
        vm = cls(manager=mgr, _vm_id=vm_id, callbacks=callbacks)
        vm._own_manager = True
        return vm

    @classmethod
    def from_snapshot(
        cls,
        snapshot_id: str,
        *,
        resume_vm: bool = True,
        backend: str | None = None,
        vm_id: str | None = None,
        env_vars: dict[str, str] | None = None,
        port_forwards: dict[int, int] | None = None,
        comm_channel: str | None = None,
        internet_settings: InternetSettings | dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        data_dir: Path | None = None,
        socket_dir: Path | None = None,
        manager: SmolVMManager | None = None,
        detached: bool = False,
    ) -> SmolVM:
        """A new sandbox restored from snapshot ``snapshot_id`` (a name or
        ``SnapshotInfo.snapshot_id``) on :meth:`start` / ``with`` entry: its own disk
        overlay, ports and identity; deleted on ``with`` exit. ``resume_vm=False`` leaves
        it paused after the restore (:meth:`resume` runs it). The clone keeps the
        snapshot's network policy unless ``internet_settings`` is given."""
        mgr = manager or SmolVMManager(data_dir=data_dir, socket_dir=socket_dir, backend=backend)
        try:
            with lifetime.owning(mgr, enabled=not detached):
                info = snapshots.create_clone(
                    mgr,
                    snapshot_id,
                    vm_id=vm_id,
                    env_vars=env_vars,
                    port_forwards=port_forwards,
                    comm_channel=comm_channel,
                    internet_settings=internet_settings,
                )
        except BaseException:
            if manager is None:
                mgr.close()
            raise
        vm = cls(manager=mgr, _vm_id=info.vm_id, callbacks=callbacks, detached=detached)
        vm._owned = True
        vm._own_manager = manager is None
        vm._resume_on_start = resume_vm
        return vm

    # ------------------------------------------------------------------ properties
    @property
    def vm_id(self) -> str:
        return self._info.vm_id

    @property
    def info(self) -> VMInfo:
        """The VM's record (cached; :meth:`refresh` re-reads it)."""
        return self._info

    @property
    def status(self) -> VMState:
        return self.refresh().status

    @property
    def data_dir(self) -> Path:
        return self._manager.data_dir

    @property
    def manager(self) -> SmolVMManager:
        return self._manager

    def refresh(self) -> VMInfo:
        self._info = self._manager.get(self.vm_id)
        return self._info

    def get_ip(self) -> str | None:
        """The guest's IP address (on user-mode networking, reachable only through forwards)."""
        return self._info.network.guest_ip

    def add_callback(self, callback: Callback) -> SmolVM:
        """Register a callback (fires after those already registered); returns ``self``."""
        if not isinstance(callback, Callback):
            raise TypeError(f"callback must be a smolvm.Callback instance, got {type(callback).__name__}")
        self._callbacks.append(callback)
        return self

    # ------------------------------------------------------------------ lifecycle
    @lifecycle("start")
    def start(self, boot_timeout: float = BOOT_TIMEOUT) -> SmolVM:
        """Boot the VM and wait up to ``boot_timeout`` seconds until it is ready; returns self
        (at once when it already runs, e.g. handed out running by a warm pool)."""
        if self._owned and self.refresh().status is VMState.RUNNING:
            return self
        try:
            self._info = self._manager.start(self.vm_id, boot_timeout=boot_timeout, keep_channel=True)
        except SmolVMError as exc:
            ref = self._info.snapshot or ""
            if not (self._owned and ref.startswith("image:") and self._info.started_at is None):
                raise
            self._info = cold_boot_instead(self._manager, self._info, exc, not self._detached, boot_timeout)
        if not self._resume_on_start and self._info.status is VMState.RUNNING:
            self._resume_on_start = True  # once: a later stop/start boots normally
            self.pause()
        return self

    @lifecycle("stop")
    def stop(self, timeout: float = STOP_TIMEOUT) -> SmolVM:
        """Shut down cleanly, killing the VM after ``timeout`` seconds."""
        self._close_transport()
        self._info = self._manager.stop(self.vm_id, timeout=timeout)
        return self

    @lifecycle("delete")
    def delete(self) -> None:
        """Remove the VM, its forwards, state and disk (unless ``retain_disk_on_delete``)."""
        self._close_transport()
        self._manager.delete(self.vm_id)

    def close(self) -> None:
        """Release connections and handles (not the VM). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._idle:
            self._idle.close()
        self._close_transport()
        if self._own_manager:
            self._manager.close()

    @lifecycle("pause")
    def pause(self) -> SmolVM:
        """Freeze the VM (its vCPUs stop; memory and connections stay)."""
        self._info = self._manager.pause(self.vm_id)
        return self

    @lifecycle("resume")
    def resume(self) -> SmolVM:
        """Continue a paused VM; its clock is reset and its RNG reseeded."""
        self._info = self._manager.resume(self.vm_id, transport=self._transport)
        return self

    def _idle_sleep(self, action: str) -> None:
        if self.refresh().status is VMState.RUNNING:
            self.pause() if action == "pause" else self.stop()

    def _idle_wake(self, action: str) -> None:
        status = self.refresh().status
        self.resume() if status is VMState.PAUSED else self.start() if status is VMState.STOPPED else None

    @lifecycle("snapshot")
    def snapshot(self, name: str | None = None, *, resume: bool = True) -> SnapshotInfo:
        """Save memory, devices and disk as snapshot ``name`` (generated when None).

        Restore clones with ``SmolVM.from_snapshot(info.snapshot_id)``. The VM pauses for
        ~0.1-0.3 s and then continues (``resume=False`` leaves it paused)."""
        info = snapshots.create_snapshot(
            self._manager, self.vm_id, name or snapshot_name(), resume=resume, transport=self._transport
        )
        self.refresh()
        return info

    def __enter__(self) -> SmolVM:
        if self._owned and self.refresh().status in (VMState.CREATED, VMState.STOPPED):
            try:
                self.start()
            except BaseException:
                self._teardown()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._owned:
                # The disk goes with the VM, so a graceful guest shutdown would be wasted
                # time — unless the disk is kept.
                self._close_transport()
                if self._info.config.retain_disk_on_delete and self.refresh().status is VMState.RUNNING:
                    self.stop()
                self.delete()
            elif self.refresh().status in (VMState.RUNNING, VMState.PAUSED):
                self.stop()
        finally:
            self.close()

    # ------------------------------------------------------------------ channel
    def _has_agent(self) -> bool:
        return self._manager.has_agent(self._info.config)

    def _channel(self) -> Transport:
        with self._tlock:
            if self._transport is not None:
                return self._transport
            info = self.refresh()
            if info.status is not VMState.RUNNING:
                raise CommandExecutionUnavailableError(
                    f"VM {self.vm_id} is {info.status.value}, not running",
                    "start it first: vm.start() (or use `with SmolVM(...) as vm:`)",
                    self.vm_id,
                )
            self._transport = self._manager.transport(self.vm_id, self._choose_channel(info))
            return self._transport

    def _choose_channel(self, info: VMInfo) -> str:
        want = info.config.comm_channel
        if want == "auto":
            return "agent" if self._has_agent() else "ssh"
        return want

    def _close_transport(self) -> None:
        with self._tlock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    @property
    def channel(self) -> str | None:
        """The command channel in use ("agent" | "ssh"), or None before the first command."""
        return self._transport.name if self._transport else None

    def can_run_commands(self) -> bool:
        """True when the VM runs and has an agent or an SSH-capable image."""
        info = self.refresh()
        if info.status is not VMState.RUNNING:
            return False
        if self._has_agent():
            return True
        return "init=" in info.config.boot_args and info.network.ssh_host_port is not None

    def run(
        self,
        command: str,
        timeout: float | None = 30,
        shell: str = "login",
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        limits: Limits | None = None,
        max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
        capture: bool = True,
    ) -> CommandResult:
        """Run ``command`` in the guest and wait for it.

        Args:
            command: shell command line.
            timeout: seconds for the whole command; on expiry the guest process tree is
                killed and ``OperationTimeoutError`` is raised. ``None`` waits forever.
            shell: "login" (loads /etc/profile and smolvm_env.sh) or "raw" (no profile).
            on_stdout/on_stderr: called with each output chunk (bytes) as it arrives.
            limits: caps of this command's session (processes, memory, CPU weight; see
                :class:`Limits`), default ``VMConfig.command_limits`` or the guest's.
            max_output_bytes: bytes of each stream kept in the result (default 128 MiB;
                None = all); the rest still reaches the callbacks and ``truncated`` is set.
            capture: False keeps no output (the callbacks get it all): constant memory for
                output of any size.

        An exception raised by an output callback stops the command (its whole session is
        killed) and propagates. A guest that dies under the command (kernel panic) raises
        ``GuestCrashedError`` (the VM is then ERROR; the message ends with its console tail).
        """
        req = self._request(command, timeout, shell, env, cwd, stdin, limits, max_output_bytes, capture)
        ctx = RunContext(self.vm_id, command, shell, timeout, env=env, cwd=cwd, stdin=stdin)
        return run_with_callbacks(
            self._callbacks,
            ctx,
            lambda: self._crash_checked(
                lambda: self._channel().exec(req, on_stdout=on_stdout, on_stderr=on_stderr)
            ),
        )

    def spawn(
        self,
        command: str,
        shell: str = "login",
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        detach: bool = False,
        limits: Limits | None = None,
    ) -> ProcessHandle:
        """Start ``command`` in the background; returns a handle (wait/kill/stdout/stderr).

        It runs in its own session (cgroup), killed with everything it started when the
        handle is killed or this process's channel closes — unless ``detach=True``, which
        keeps it (a server, say) running after that. Pre-run callbacks can veto it like
        :meth:`run`."""
        req = self._request(command, None, shell, env, cwd, None, limits)
        req.detach = detach
        ctx = RunContext(self.vm_id, command, shell, 0, env=env, cwd=cwd)
        run_pre_hooks(self._callbacks, ctx)
        h = self._crash_checked(lambda: self._channel().spawn(req, on_stdout=on_stdout, on_stderr=on_stderr))
        return self._idle.track(h) if self._idle else h

    def pty(
        self,
        command: str | None = None,
        cols: int = 80,
        rows: int = 24,
        *,
        on_data: Callable[[bytes], None] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        """An interactive terminal (``cols`` x ``rows`` characters) running ``command``, or
        a login shell when None; agent channel only. Pre-run callbacks see it (shell "pty")
        and can veto it; what is typed into it later is not a command they see."""
        # Validated like any command, then emptied: no command on a pty = interactive login shell.
        req = self._request(command or "sh", timeout, "login", env, cwd, None, capture=False)
        req.command, req.pty = command or "", check_size(cols, rows)
        run_pre_hooks(self._callbacks, RunContext(self.vm_id, req.command, "pty", 0, env=env, cwd=cwd))
        start = lambda cb: self._crash_checked(lambda: self._channel().spawn(req, on_stdout=cb))  # noqa: E731
        h = PtyHandle(start, on_data)
        return self._idle.track(h) if self._idle else h

    def _crash_checked(self, call: Callable[[], T]) -> T:
        """``call()`` (a use of the sandbox: woken first if idle), turning a channel failure
        caused by a dead guest into GuestCrashedError."""
        try:
            with self._idle.use() if self._idle else contextlib.nullcontext():
                return call()
        except (OperationTimeoutError, CommandFateUnknownError, AgentError):
            raise
        except TransportError as exc:
            tail = self._manager.crash_report(self.vm_id)
            if tail is None:
                raise
            self._close_transport()
            self._info = self._manager.get(self.vm_id)
            raise GuestCrashedError(
                f"VM {self.vm_id} crashed while running the command (its VMM exited; the VM is "
                f"now {self._info.status.value}). Serial console:\n{tail}",
                {"vm_id": self.vm_id},
            ) from exc

    def _request(
        self,
        command: str,
        timeout: float | None,
        shell: str,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        limits: Limits | None = None,
        max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
        capture: bool = True,
    ) -> ExecRequest:
        limits = limits if limits is not None else self._info.config.command_limits
        return exec_request(command, timeout, shell, env, cwd, stdin, limits, max_output_bytes, capture)

    async def arun(
        self, command: str, timeout: float | None = 30, shell: str = "login", **kw: Any
    ) -> CommandResult:
        """``run`` for asyncio code: the same core, on a worker thread."""
        import asyncio  # ~30 ms to import: only coroutine callers pay it

        return await asyncio.to_thread(self.run, command, timeout, shell, **kw)

    # ------------------------------------------------------------------ files
    @functools.cached_property
    def files(self) -> Files:
        """The guest's filesystem: read, write, list, exists, remove, make_dir, rename."""
        return Files(self, self._watch_dir)

    def _watch_dir(
        self, path: str, recursive: bool, on_event: Callable[[str, str], object] | None
    ) -> WatchHandle:
        ctx = FileContext(self.vm_id, "watch", path, "")
        return around(
            self._callbacks,
            "file",
            ctx,
            lambda: self._crash_checked(
                lambda: self._channel().watch(path, recursive=recursive, on_event=on_event)
            ),
        )

    def upload_file(self, local_path: str | Path, guest_path: str, mode: int | None = None) -> None:
        """Copy a host file into the guest (streamed; keeps its permissions unless ``mode``)."""
        p = Path(local_path).expanduser()
        if not p.is_file():
            raise ValidationError(f"local file does not exist: {p}", field="local_path")
        ctx = FileContext(self.vm_id, "upload", guest_path, str(p), mode, p.stat().st_size)
        around(
            self._callbacks,
            "file",
            ctx,
            lambda: self._crash_checked(lambda: self._channel().upload(p, guest_path, mode)),
        )

    def download_file(
        self, guest_path: str, local_path: str | Path, *, max_bytes: int | None = DEFAULT_MAX_DOWNLOAD
    ) -> None:
        """Copy a guest file to the host (streamed, written atomically; keeps its
        permissions except setuid/setgid/sticky and group/world write bits). A file over
        ``max_bytes`` (default 1 GiB; None: no limit) raises ``TransferLimitError`` and
        leaves nothing at ``local_path``."""
        dest = Path(local_path).expanduser()
        ctx = FileContext(self.vm_id, "download", guest_path, str(dest))

        def fetch() -> None:
            self._crash_checked(lambda: self._channel().download(guest_path, dest, max_bytes))
            ctx.size = dest.stat().st_size

        around(self._callbacks, "file", ctx, fetch)

    def __repr__(self) -> str:
        return f"SmolVM(vm_id={self.vm_id!r}, status={self._info.status.value})"


__all__ = ["SmolVM"]
