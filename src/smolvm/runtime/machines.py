"""The runtime: VM create / boot / halt / purge / reconcile over the state store.

Order of operations is what makes crash recovery possible: every host resource (overlay
disk, VM dir, sockets, ports, the VMM process) is recorded in the state store *before* it
is created, so ``reconcile()`` can find and remove it after a crash. Snapshots and pools
build on this layer; the public ``SmolVMManager`` composes them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smolvm import procs
from smolvm.backends import get_backend, resolve_backend
from smolvm.backends.base import Backend, LaunchSpec, MemorySpec, socket_files
from smolvm.exceptions import (
    BackendError,
    InvalidStateError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMNotFoundError,
)
from smolvm.host.accel import accel_decision
from smolvm.images.artifacts import artifacts_for_kernel
from smolvm.images.configdisk import build_config_disk
from smolvm.keys import HostKey, ensure_client_key, write_known_hosts
from smolvm.network import NetworkManager
from smolvm.network.tap import ensure_tap, start_forwards
from smolvm.paths import default_socket_dir, resolve_data_dir, resolve_image_dir
from smolvm.runtime import channels, console, health, hostlimits, lifetime, resources
from smolvm.runtime.identity import env_file_text, refresh_clock_and_entropy
from smolvm.runtime.memory import boot_memory
from smolvm.runtime.overlay import write_overlay
from smolvm.runtime.spec import READY_MARKER, launch_spec, mounts_file
from smolvm.state import StateStore
from smolvm.state.records import VMRecord
from smolvm.transports.agent import AgentTransport
from smolvm.transports.base import Transport
from smolvm.types import NetworkInfo, VMConfig, VMInfo, VMState

log = logging.getLogger(__name__)

#: Seconds a graceful stop waits for the guest to power off before the VMM is killed.
STOP_TIMEOUT = 10.0
#: Seconds a boot (or restore) may take before it counts as failed.
BOOT_TIMEOUT = 30.0
MIB = 1024 * 1024


def _supports_user_xattrs(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".smolvm-xattr-") as f:
            os.setxattr(f.name, "user.smolvm", b"1")
        return True
    except OSError:
        return False


def progress_to_stderr(msg: str) -> None:
    print(f"smolvm: {msg}", file=sys.stderr, flush=True)


class Runtime:
    """Machines in one data dir: their state rows, host resources and VMM processes.

    ``state``: share an open state store (its owner closes it) instead of opening one."""

    def __init__(
        self,
        data_dir: Path | None = None,
        socket_dir: Path | None = None,
        backend: str | None = None,
        *,
        state: StateStore | None = None,
    ) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self.socket_dir = Path(socket_dir) if socket_dir else default_socket_dir(self.data_dir)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.backend = resolve_backend(backend)
        self.disk_dir = self.data_dir / "disks"
        self.vms_dir = self.data_dir / "vms"
        self.keys_dir = self.data_dir / "keys"
        self.cache_dir = self.data_dir / "cache"
        for d in (self.disk_dir, self.vms_dir, self.keys_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._owns_state = state is None
        self.state = state if state is not None else StateStore(self.data_dir / "state.db")
        self.network = NetworkManager(self.state)
        self.image_dir = resolve_image_dir(self.data_dir)
        self._backends: dict[str, Backend] = {}
        #: Agent connections opened by a restore or pool hand-out, taken by transport().
        self._handoff: dict[str, Transport] = {}
        self._closed = False

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release connections and database handles. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            for t in self._handoff.values():
                t.close()
            self._handoff.clear()
            if self._owns_state:
                self.state.close()

    # ------------------------------------------------------------------ backends & paths
    def backend_for(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = get_backend(name)
        return self._backends[name]

    def check_prerequisites(self) -> list[str]:
        errors = list(self.backend_for(self.backend).check_prerequisites())
        if not shutil.which("ssh"):
            errors.append("ssh client missing: apt-get install openssh-client")
        return errors

    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def spec(self, rec: VMRecord) -> LaunchSpec:
        """The launch description of a VM from its record."""
        return launch_spec(
            rec, self.backend_for(rec.backend), vm_dir=self.vm_dir(rec.vm_id), socket_dir=self.socket_dir
        )

    def accelerator(self) -> tuple[str, str]:
        """``(accel, reason)`` the host probe chose (cached per host boot)."""
        return (probe := accel_decision(self.cache_dir)).accel, probe.reason

    # ------------------------------------------------------------------ hand-off
    def hand_off(self, vm_id: str, transport: Transport) -> None:
        """Keep an open agent connection for the next :meth:`transport` call of ``vm_id``
        (QEMU serves one client per agent port: a restore's connection is reused)."""
        old = self._handoff.pop(vm_id, None)
        if old is not None and old is not transport:
            old.close()
        self._handoff[vm_id] = transport

    def handed_off(self, vm_id: str) -> Transport | None:
        """The kept connection of ``vm_id`` (still kept), or None."""
        return self._handoff.get(vm_id)

    def drop_handoff(self, vm_id: str) -> None:
        if (t := self._handoff.pop(vm_id, None)) is not None:
            t.close()

    # ------------------------------------------------------------------ create
    def resolve_image(self, config: VMConfig) -> VMConfig:
        """``config`` with kernel and rootfs set (the default image, built on first use)."""
        if config.kernel_path and config.rootfs_path:
            return config
        if config.kernel_path or config.rootfs_path:
            raise ValidationError(
                "set both kernel_path and rootfs_path, or neither to use the default image",
                field="kernel_path" if not config.kernel_path else "rootfs_path",
            )
        # First use builds the image (~1 min): say what is happening on stderr.
        from smolvm.images.builder import ImageBuilder  # ~7 ms to import; only builds need it

        art = ImageBuilder(self.image_dir, progress=progress_to_stderr).ensure_default()
        return config.model_copy(update={"kernel_path": art.kernel, "rootfs_path": art.rootfs})

    def create(self, config: VMConfig) -> VMInfo:
        """Allocate disk, ports and identity for a VM and persist it (not started)."""
        if not isinstance(config, VMConfig):
            raise ValidationError(f"config must be a VMConfig, got {type(config).__name__}", field="config")
        config = self.resolve_image(config)
        hostlimits.check_paths(config, hostlimits.trusted_roots(self.image_dir, self.data_dir))
        name = resolve_backend(config.backend) if config.backend else self.backend
        backend = self.backend_for(name)
        if config.workspace_mounts and not backend.supports_shares:
            raise ValidationError(
                f"the {name} backend cannot share host directories: use backend='qemu'",
                field="workspace_mounts",
            )
        for m in config.workspace_mounts:
            if m.writable and not _supports_user_xattrs(m.host_path):
                raise ValidationError(
                    f"writable mount {m.host_path}: its filesystem does not support user xattrs "
                    "(needed to keep guest file modes off the host); mount it read-only",
                    field="workspace_mounts",
                )
        if config.network not in backend.network_modes:
            raise ValidationError(
                f"the {name} backend has no network={config.network!r}: use one of "
                f"{sorted(backend.network_modes)}, or backend='qemu'",
                field="network",
            )
        ext = "qcow2" if backend.disk_format == "qcow2" else "raw"
        disk = self.disk_dir / f"{config.vm_id}.{ext}"
        return self.provision(config, name, disk, lambda: self._create_disk(config, disk, backend))

    def provision(
        self,
        config: VMConfig,
        backend: str,
        disk: Path,
        make_disk: Callable[[], None],
        *,
        snapshot: str | None = None,
        pool: str | None = None,
        pool_owner: str | None = None,
        mac: str | None = None,
    ) -> VMInfo:
        """Record a VM (within the host's limits), then create its dir, host key, disk
        (``make_disk``) and network, each recorded first; on failure all is removed again."""
        hostlimits.check(config)
        vm_id = config.vm_id
        hk = HostKey.generate()
        self.state.insert_vm(
            vm_id,
            status=VMState.CREATED,
            backend=backend,
            config=config,
            vm_dir=str(self.vm_dir(vm_id)),
            disk_path=str(disk),
            host_key=hk.public_line,
            snapshot=snapshot,
            pool=pool,
            pool_owner=pool_owner,
            owner=lifetime.current_owner(),  # set from the start: a crash mid-create is reaped too
        )
        try:
            self.init_vm_dir(vm_id, hk)
            self.state.add_resource(vm_id, "disk", str(disk))
            make_disk()
            net = self.network.allocate(vm_id, config.network, config.port_forwards, config.internet_settings)
            if mac:
                net = net.model_copy(update={"mac_address": mac})
            self.state.update_vm(vm_id, network=net)
        except BaseException:
            self.purge(vm_id, keep_disk=False)
            raise
        return self.get(vm_id)

    def init_vm_dir(self, vm_id: str, hk: HostKey) -> Path:
        """The VM's private dir (recorded first) with its SSH host key and known_hosts."""
        d = self.vm_dir(vm_id)
        self.state.add_resource(vm_id, "dir", str(d))
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / "ssh_host_key").write_bytes(hk.dropbear_private)
        (d / "ssh_host_key").chmod(0o600)
        write_known_hosts(d / "known_hosts", vm_id, hk.public_line)
        return d

    @staticmethod
    def _create_disk(config: VMConfig, disk: Path, backend: Backend) -> None:
        assert config.rootfs_path is not None
        size = config.disk_size_mib * MIB if config.disk_size_mib else None
        if backend.disk_format == "qcow2":
            write_overlay(disk, config.rootfs_path, size_bytes=size)
            return
        # A raw disk is a full (sparse, reflinked where possible) copy of the image.
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(config.rootfs_path), str(disk)],
            check=True,
            capture_output=True,
        )
        if size and disk.stat().st_size < size:
            os.truncate(disk, size)
        disk.chmod(0o600)

    # ------------------------------------------------------------------ boot
    def check_startable(self, rec: VMRecord) -> None:
        if rec.status not in (VMState.CREATED, VMState.STOPPED):
            raise InvalidStateError(
                f"cannot start VM {rec.vm_id!r} in state {rec.status.value}: only created or "
                "stopped VMs start"
                + (" (run `smolvm reconcile` and delete it)" if rec.status is VMState.ERROR else ""),
                {"vm_id": rec.vm_id, "status": rec.status.value},
            )

    def boot(self, vm_id: str, boot_timeout: float = BOOT_TIMEOUT) -> VMInfo:
        """Cold-boot a CREATED or STOPPED VM and wait (``boot_timeout`` seconds) until ready."""
        rec = self.state.get_vm(vm_id)
        self.check_startable(rec)
        if self.backend_for(rec.backend).selects_accelerator:
            accel, reason = self.accelerator()
            self.state.update_vm(vm_id, accelerator=accel, accelerator_reason=reason)
            rec = self.state.get_vm(vm_id)
        if rec.network.mode == "tap":
            ensure_tap(self.state, vm_id, rec.network, rec.config.internet_settings)
        spec = self.spec(rec)
        self.write_config_disk(rec, spec)
        return self.launch(rec, spec, boot_timeout)

    def write_config_disk(self, rec: VMRecord, spec: LaunchSpec, *, with_env: bool = True) -> Path:
        """The VM's config disk (hostname, keys, env) for the next boot; returns its path."""
        _, pub = ensure_client_key(self.keys_dir)
        files: dict[str, bytes | str] = {
            "hostname": rec.vm_id[:63] + "\n",
            "authorized_keys": pub + "\n",
            "ssh_host_ed25519_key": (spec.vm_dir / "ssh_host_key").read_bytes(),
        }
        if with_env and rec.config.env_vars:
            files["env.sh"] = env_file_text(rec.config.env_vars)
        if rec.config.workspace_mounts:
            files["mounts"] = mounts_file(rec)
        if rec.config.comm_channel == "ssh":
            files["wait-ssh"] = ""  # the guest announces readiness once SSH listens
        path = spec.vm_dir / "config.tar"
        self.state.add_resource(rec.vm_id, "file", str(path))
        build_config_disk(path, files, {"vm_id": rec.vm_id})
        return path

    def launch(self, rec: VMRecord, spec: LaunchSpec, boot_timeout: float) -> VMInfo:
        """Start the VMM (sockets and process recorded first). Waits for the guest's ready
        marker unless ``spec.incoming`` (a restore: the snapshot layer loads the state)."""
        vm_id = rec.vm_id
        backend = self.backend_for(rec.backend)
        for s in socket_files(spec):
            if s.name.endswith(".sock"):
                self.state.add_resource(vm_id, "socket", str(s))
        if spec.net is not None and spec.net.sandbox is not None:
            spec.net.sandbox.record_helper = lambda pid: self.state.add_resource(
                vm_id, "helper", procs.process_token(pid)
            )
        spec.on_spawn = lambda pid: self.state.add_resource(vm_id, "process", procs.process_token(pid))
        self.state.update_vm(vm_id, error=None)
        if spec.memory is None and backend.supports_memory_file:
            spec.memory = boot_memory(self.state, vm_id)  # shared RAM file: fast snapshots
        hold = -1
        try:
            if rec.network.mode == "tap":
                start_forwards(self.state, vm_id, rec.network)  # socat relays on 127.0.0.1
            hold = console.start(self.state, vm_id, spec.vm_dir)
            pid = backend.launch(spec)
        except SmolVMError as exc:
            resources.kill_processes(self.state, vm_id)  # helpers started so far
            self.state.update_vm(vm_id, status=VMState.ERROR, error=str(exc))
            raise
        finally:
            if hold >= 0:
                os.close(hold)  # the VMM holds the console FIFO now
        mem: MemorySpec | None = spec.memory
        if mem is not None and mem.unlink and mem.path is not None:
            self.state.remove_resource("file", str(mem.path))  # unlinked by launch()
        token = procs.process_token(pid)  # recorded by spec.on_spawn when it was spawned
        self.state.update_vm(vm_id, status=VMState.RUNNING, pid=pid, started_at=time.time())
        if spec.incoming is None:
            self._wait_ready(vm_id, spec, pid, token, boot_timeout)
        return self.get(vm_id)

    def _wait_ready(self, vm_id: str, spec: LaunchSpec, pid: int, token: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        current = console.console_dir(spec.vm_dir) / "current"  # this boot's (console.start)
        while True:
            try:
                with open(current, "rb") as f:
                    if READY_MARKER in f.read(1 << 20):  # within the first MiB, or never
                        return
            except FileNotFoundError:
                pass
            if not procs.is_alive(pid, token):
                console.wait_written(self.state, vm_id)
                tail = self.serial_tail(vm_id)
                self.state.update_vm(
                    vm_id, status=VMState.ERROR, pid=None, error="VM process exited during boot"
                )
                raise BackendError(f"VM {vm_id} exited during boot. Serial console tail:\n{tail}")
            if time.monotonic() >= deadline:
                procs.kill(pid, token)
                self.state.update_vm(
                    vm_id, status=VMState.ERROR, pid=None, error=f"boot timed out after {timeout} s"
                )
                raise OperationTimeoutError(
                    f"VM {vm_id} did not become ready within {timeout} s (accelerator "
                    f"{spec.accel}); raise boot_timeout or see `smolvm logs {vm_id}`.\n"
                    f"{self.serial_tail(vm_id)}",
                    timeout,
                    {"vm_id": vm_id},
                )
            time.sleep(0.005)

    def fail(self, vm_id: str, reason: str) -> None:
        """Mark a VM ERROR (failed start, crashed guest): kill its VMM, remove its sockets."""
        rec = self.state.get_vm(vm_id)
        resources.kill_processes(self.state, vm_id)
        self.state.update_vm(vm_id, status=VMState.ERROR, pid=None, error=reason)
        for s in socket_files(self.spec(rec)):
            s.unlink(missing_ok=True)

    def serial_tail(self, vm_id: str, n: int = 4000) -> str:
        """The last ``n`` bytes of the VM's serial console, as text."""
        return console.tail(self.vm_dir(vm_id), n).decode("utf-8", "replace")

    # ------------------------------------------------------------------ stop / delete
    def stop(self, vm_id: str, timeout: float = STOP_TIMEOUT) -> VMInfo:
        """Shut the guest down cleanly; kill the VMM after ``timeout`` seconds."""
        rec = self.state.get_vm(vm_id)
        if rec.status in (VMState.RUNNING, VMState.PAUSED):
            self.halt(rec, graceful=True, timeout=timeout)
        self.state.update_vm(vm_id, status=VMState.STOPPED, pid=None)
        return self.get(vm_id)

    def halt(self, rec: VMRecord, *, graceful: bool, timeout: float) -> None:
        """End the VMM process: ask the guest to power off first when ``graceful``."""
        vm_id, pid = rec.vm_id, rec.pid
        self.drop_handoff(vm_id)
        token = resources.process_token(self.state, vm_id)
        spec = self.spec(rec)
        backend = self.backend_for(rec.backend)
        if graceful and procs.is_alive(pid, token):
            if rec.status is VMState.PAUSED:
                self._quietly(lambda: backend.resume(spec))
            self._request_guest_shutdown(spec, backend)
            if pid and not procs.wait_gone(pid, timeout, token):
                log.warning("VM %s did not shut down within %.1f s; killing it", vm_id, timeout)
        resources.kill_processes(self.state, vm_id)
        for s in socket_files(spec):
            s.unlink(missing_ok=True)

    @staticmethod
    def _request_guest_shutdown(spec: LaunchSpec, backend: Backend) -> None:
        """Ask the guest's PID 1 to power off: agent first, then the VMM's own request."""
        if spec.agent_socket.exists():
            try:
                t = channels.agent_transport(spec, backend, connect_timeout=1.0)
                try:
                    t.shutdown()
                    return
                finally:
                    t.close()
            except (SmolVMError, OSError) as exc:
                log.debug("agent shutdown of %s failed: %s", spec.vm_id, exc)
        try:
            backend.request_shutdown(spec)
        except SmolVMError as exc:
            log.debug("VMM shutdown request for %s failed: %s", spec.vm_id, exc)

    @staticmethod
    def _quietly(fn: Callable[[], object]) -> None:
        try:
            fn()
        except SmolVMError as exc:
            log.debug("ignored: %s", exc)

    def delete(self, vm_id: str) -> None:
        """Remove the VM: its process, forwards, state row and disk (unless retained)."""
        rec = self.state.get_vm(vm_id)
        if rec.pid:
            self.halt(rec, graceful=False, timeout=0)
        self.purge(vm_id, keep_disk=rec.config.retain_disk_on_delete)

    def purge(self, vm_id: str, *, keep_disk: bool) -> None:
        """Remove every recorded resource of ``vm_id``, its network and its row."""
        try:
            net = self.state.get_vm(vm_id).network
        except VMNotFoundError:
            net = NetworkInfo(mode="none")
        resources.remove_all(self.state, vm_id, keep_disk=keep_disk)
        self.network.release(vm_id, net)
        self.state.delete_vm(vm_id)

    # ------------------------------------------------------------------ queries
    def get(self, vm_id: str) -> VMInfo:
        """The VM's info; one whose VMM died is reported (and recorded) as ERROR."""
        rec = health.checked(self, self.state.get_vm(vm_id))
        if rec is None:
            raise VMNotFoundError(vm_id)
        return rec.info()

    def list_vms(self, status: VMState | None = None) -> list[VMInfo]:
        tokens = health.process_tokens(self.state)
        recs = [health.checked(self, r, tokens) for r in self.state.list_vms()]
        return [r.info() for r in recs if r is not None and (status is None or r.status is VMState(status))]

    def crash_report(self, vm_id: str, grace: float = 1.5) -> str | None:
        """See :func:`smolvm.runtime.health.crash_report`."""
        return health.crash_report(self, vm_id, grace)

    def mark_dead(self) -> list[str]:
        """Mark VMs whose VMM died as ERROR and clear their sockets; returns their ids."""
        return health.mark_dead(self)

    # ------------------------------------------------------------------ channels & misc
    def transport(self, vm_id: str, channel: str) -> Transport:
        """A command channel to a running VM: "agent" (guest agent) or "ssh"."""
        if channel == "agent" and (handed := self._handoff.pop(vm_id, None)) is not None:
            return handed
        rec = self.state.get_vm(vm_id)
        return channels.open_transport(
            rec, self.spec(rec), self.backend_for(rec.backend), channel, self.keys_dir
        )

    def set_config_env(self, vm_id: str, env: dict[str, str]) -> None:
        """Remember env vars in state so the next boot's config disk carries them."""
        rec = self.state.get_vm(vm_id)
        self.state.update_vm(vm_id, config=rec.config.model_copy(update={"env_vars": dict(env)}))

    def pause(self, vm_id: str) -> VMInfo:
        rec = self.state.get_vm(vm_id)
        if rec.status is not VMState.RUNNING:
            raise InvalidStateError(f"cannot pause VM {vm_id!r}: it is {rec.status.value}, not running")
        self.backend_for(rec.backend).pause(self.spec(rec))
        self.state.update_vm(vm_id, status=VMState.PAUSED)
        return self.get(vm_id)

    def resume(self, vm_id: str, *, transport: Transport | None = None) -> VMInfo:
        """Continue a paused VM, then reset its clock and reseed its RNG (through
        ``transport`` when the caller holds the agent channel). Resuming an idle pool VM
        takes it out of its pool."""
        rec = self.state.get_vm(vm_id)
        if rec.status is not VMState.PAUSED:
            raise InvalidStateError(f"cannot resume VM {vm_id!r}: it is {rec.status.value}, not paused")
        if rec.pool and not self.state.claim_vm(vm_id):
            raise InvalidStateError(f"VM {vm_id!r} was just handed out by its pool")
        self.backend_for(rec.backend).resume(self.spec(rec))
        self.state.update_vm(vm_id, status=VMState.RUNNING)
        self.refresh_guest(vm_id, transport)
        return self.get(vm_id)

    def has_agent(self, config: VMConfig) -> bool:
        """The VM's image has the guest agent."""
        art = artifacts_for_kernel(config.kernel_path) if config.kernel_path else None
        return bool(art and art.has_agent)

    def refresh_guest(self, vm_id: str, transport: Transport | None = None, *, timeout: float = 2.0) -> bool:
        """After a resume: set the guest clock and reseed its RNG. Best effort (False if the
        agent is unreachable, e.g. another process holds every agent port)."""
        rec = self.state.get_vm(vm_id)
        if not self.has_agent(rec.config):
            return False  # SSH-only image: nothing to talk to (its clock catches up by NTP, if any)
        t = next((c for c in (transport, self.handed_off(vm_id)) if isinstance(c, AgentTransport)), None)
        own = t is None
        try:
            if t is None:
                t = channels.agent_transport(
                    self.spec(rec), self.backend_for(rec.backend), connect_timeout=timeout
                )
            refresh_clock_and_entropy(t)
            return True
        except SmolVMError as exc:
            log.info("VM %s: guest clock/RNG not refreshed after resume: %s", vm_id, exc)
            return False
        finally:
            if own and t is not None:
                t.close()

    def get_ssh_commands(
        self,
        vm_id: str,
        *,
        ssh_user: str = "root",
        key_path: str | Path | None = None,
        public_host: str | None = None,
    ) -> dict[str, str]:
        """Ready-to-run ``ssh`` commands with the VM's host key pinned: "private_ip",
        "localhost_port" and (with ``public_host``) "public" (``VMNotFoundError`` for an
        unknown id)."""
        key = Path(key_path).expanduser() if key_path else self.keys_dir / "id_ed25519"
        return channels.ssh_commands(
            self.state.get_vm(vm_id),
            key=key,
            known_hosts=self.vm_dir(vm_id) / "known_hosts",
            ssh_user=ssh_user,
            public_host=public_host,
        )
