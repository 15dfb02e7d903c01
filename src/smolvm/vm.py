"""SmolVMManager: VM lifecycle with state persisted in SQLite (any process can reconnect).

Order of operations is what makes crash recovery possible: every host resource (overlay
disk, VM dir, sockets, ports, the VMM process) is recorded in the state store *before* it
is created, so ``reconcile()`` can find and remove it after a crash.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smolvm.backends import LaunchSpec, get_backend, resolve_backend
from smolvm.backends.base import (AGENT_PORTS, DiskSpec, NetSpec, agent_lock_path, agent_sockets,
                                  socket_files)
from smolvm.exceptions import (
    BackendError,
    CommandExecutionUnavailableError,
    ImageError,
    InvalidStateError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMNotFoundError,
)
from smolvm.host.tsc import host_tsc_khz
from smolvm.images.builder import ImageBuilder, artifacts_for_kernel
from smolvm.images.configdisk import build_config_disk
from smolvm.keys import HostKey, ensure_client_key, host_key_alias, write_known_hosts
from smolvm.network import NetworkManager
from smolvm.paths import resolve_data_dir, resolve_image_dir
from smolvm import procs
from smolvm.state import StateStore
from smolvm.transports.base import Transport
from smolvm.types import NetworkInfo, VMConfig, VMInfo, VMState
from smolvm.vmhost import HostManager, env_file_text

log = logging.getLogger("smolvm")

READY_MARKER = b"SMOLVM_READY"
#: Kernel arguments that make microvm boots fast and reliable under TCG (platform notes).
FAST_BOOT_ARGS = (
    "quiet cryptomgr.notests 8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp "
    "random.trust_cpu=on audit=0 selinux=0 apparmor=0 nowatchdog no_timer_check"
)


def merge_boot_args(base: str, extra: list[str]) -> str:
    """Append ``extra`` args whose key is not already set in ``base``."""
    have = {a.split("=", 1)[0] for a in base.split()}
    add = [a for a in extra if a.split("=", 1)[0] not in have]
    return " ".join([base, *add]).strip()


class SmolVMManager:
    """Creates, starts, stops and deletes microVMs; state lives in ``data_dir/state.db``."""

    def __init__(self, data_dir: Path | None = None, socket_dir: Path | None = None,
                 backend: str | None = None) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self.socket_dir = Path(socket_dir) if socket_dir else Path("/tmp")
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.backend = resolve_backend(backend)
        self.disk_dir = self.data_dir / "disks"
        self.vms_dir = self.data_dir / "vms"
        self.keys_dir = self.data_dir / "keys"
        for d in (self.disk_dir, self.vms_dir, self.keys_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = StateStore(self.data_dir / "state.db")
        self.network = NetworkManager(self.state)
        self.host = HostManager(self.data_dir)
        self.image_dir = resolve_image_dir(self.data_dir)
        self._backends: dict[str, Any] = {}
        #: Agent connections opened by a restore or pool hand-out, taken by transport().
        self._handoff: dict[str, Transport] = {}
        self._closed = False

    # ------------------------------------------------------------------ basics
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

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release database handles. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            for t in self._handoff.values():
                t.close()
            self._handoff.clear()
            self.state.close()

    def backend_for(self, name: str):
        if name not in self._backends:
            self._backends[name] = get_backend(name)
        return self._backends[name]

    def check_prerequisites(self) -> list[str]:
        errors = list(self.backend_for(self.backend).check_prerequisites())
        if self.backend == "firecracker":
            return errors
        if not shutil.which("ssh"):
            errors.append("ssh client missing: apt-get install openssh-client")
        return errors

    # ------------------------------------------------------------------ paths
    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def spec(self, row: dict[str, Any]) -> LaunchSpec:
        """The launch description of a VM from its state row (used by every operation)."""
        cfg = _stored_config(row["config"])
        vm_id = row["vm_id"]
        d = self.vm_dir(vm_id)
        net = NetworkInfo.model_validate(row["network"])
        netspec = None
        if net.mode == "user":
            fwd = [(net.ssh_host_port, 22), *((h, g) for h, g in net.port_forwards.items())]
            netspec = NetSpec("user", net.mac_address or "52:54:00:12:34:56", fwd)
        elif net.mode == "tap":
            netspec = NetSpec("tap", net.mac_address or "52:54:00:12:34:56", [], net.tap_device)
        fmt = "raw" if row["backend"] == "firecracker" else "qcow2"
        disks = [DiskSpec(Path(row["disk_path"]), fmt, False, "d0"),
                 DiskSpec(d / "config.tar", "raw", True, "d1")]
        art = artifacts_for_kernel(cfg.kernel_path) if cfg.kernel_path else None
        initrd = cfg.initrd_path or (art.initrd if art else None)
        args = [f"tsc_early_khz={khz}"] if (khz := host_tsc_khz()) else []
        args += FAST_BOOT_ARGS.split()
        if (narg := NetworkManager.kernel_arg(net)) is not None:
            args.append(narg)
        base_mb = (art.manifest.get("rootfs_size_mb") if art else None) or 0
        if cfg.disk_size_mib and cfg.disk_size_mib > base_mb:
            args.append("smolvm.resize=1")
        return LaunchSpec(
            vm_id=vm_id, vm_dir=d, kernel=Path(cfg.kernel_path), initrd=initrd, disks=disks,
            boot_args=merge_boot_args(cfg.boot_args, args), vcpus=cfg.vcpu_count,
            mem_mib=cfg.mem_size_mib, serial_log=d / "serial.log",
            agent_socket=self.socket_dir / f"smolvm-{vm_id}.agent.sock",
            control_socket=self.socket_dir / f"smolvm-{vm_id}.ctl.sock",
            net=netspec, accel=row.get("accelerator") or "tcg",
            agent_ports=1 if row["backend"] == "firecracker" else AGENT_PORTS,
        )

    # ------------------------------------------------------------------ create
    def _resolve_image(self, config: VMConfig) -> VMConfig:
        if config.kernel_path and config.rootfs_path:
            return config
        if config.kernel_path or config.rootfs_path:
            raise ValidationError(
                "set both kernel_path and rootfs_path, or neither to use the default image",
                field="kernel_path" if not config.kernel_path else "rootfs_path")
        # First use builds the image (~1 min): say what is happening on stderr.
        art = ImageBuilder(self.image_dir, progress=_progress_to_stderr).ensure_default()
        return config.model_copy(update={"kernel_path": art.kernel, "rootfs_path": art.rootfs})

    def create(self, config: VMConfig) -> VMInfo:
        """Allocate disk, ports and identity for a VM and persist it (not started)."""
        if not isinstance(config, VMConfig):
            raise ValidationError(f"config must be a VMConfig, got {type(config).__name__}", field="config")
        config = self._resolve_image(config)
        backend = resolve_backend(config.backend) if config.backend else self.backend
        if backend == "firecracker" and config.network == "user":
            raise ValidationError(
                "Firecracker has no user-mode networking: use network='tap' (root) or 'none', "
                "or backend='qemu'", field="network")
        vm_id = config.vm_id
        d = self.vm_dir(vm_id)
        # Firecracker reads raw images only; QEMU gets a thin qcow2 overlay on the shared image.
        disk = self.disk_dir / (f"{vm_id}.raw" if backend == "firecracker" else f"{vm_id}.qcow2")
        hk = HostKey.generate()
        self.state.insert_vm(vm_id, status=VMState.CREATED.value, backend=backend,
                             config=config.model_dump(mode="json"), vm_dir=str(d),
                             disk_path=str(disk), host_key=hk.public_line)
        try:
            self.init_vm_dir(vm_id, hk)
            self.state.add_resource(vm_id, "disk", str(disk))
            self._create_disk(config, disk, backend)
            net = self.network.allocate(vm_id, config.network, config.port_forwards)
            self.state.update_vm(vm_id, network=net.model_dump(mode="json"))
        except BaseException:
            self._purge(vm_id, keep_disk=False)
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

    def _create_disk(self, config: VMConfig, disk: Path, backend: str) -> None:
        assert config.rootfs_path is not None
        if backend == "firecracker":
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(config.rootfs_path), str(disk)],
                           check=True, capture_output=True)
            if config.disk_size_mib and disk.stat().st_size < config.disk_size_mib * 1024 * 1024:
                os.truncate(disk, config.disk_size_mib * 1024 * 1024)
            disk.chmod(0o600)
            return
        size = []
        if config.disk_size_mib:
            base = config.rootfs_path.stat().st_size // (1024 * 1024)
            size = [f"{max(config.disk_size_mib, base)}M"]
        fmt = "qcow2" if _is_qcow2(config.rootfs_path) else "raw"
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(config.rootfs_path), "-F", fmt,
             str(disk), *size], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"cannot create the VM's disk overlay {disk}: {proc.stderr.strip()}")
        disk.chmod(0o600)

    # ------------------------------------------------------------------ start
    def start(self, vm_id: str, boot_timeout: float = 30.0, *, keep_channel: bool = False) -> VMInfo:
        """Boot a CREATED or STOPPED VM and wait (``boot_timeout`` seconds) until it is ready.

        A VM created from a snapshot is restored instead; ``keep_channel`` keeps the agent
        connection that restore opened for this manager's next ``transport()`` call (QEMU
        serves one agent client at a time, so only a caller that will use it should)."""
        row = self.state.get_vm(vm_id)
        status = VMState(row["status"])
        if status not in (VMState.CREATED, VMState.STOPPED):
            raise InvalidStateError(
                f"cannot start VM {vm_id!r} in state {status.value}: only created or stopped VMs "
                "start" + (" (run `smolvm reconcile` and delete it)" if status is VMState.ERROR else ""),
                {"vm_id": vm_id, "status": status.value})
        if row["snapshot"] and row["started_at"] is None:
            from smolvm.snapshots import restore_vm

            info = restore_vm(self, vm_id, boot_timeout=boot_timeout)
            if not keep_channel and (handed := self._handoff.pop(vm_id, None)) is not None:
                handed.close()
            return info
        if row["backend"] == "qemu":
            probe = self.host.accel()
            self.state.update_vm(vm_id, accelerator=probe.accel, accelerator_reason=probe.reason)
            row = self.state.get_vm(vm_id)
        net = NetworkInfo.model_validate(row["network"])
        if net.mode == "tap":
            from smolvm.network.tap import ensure_tap

            ensure_tap(self.state, vm_id, net)
        spec = self.spec(row)
        self._write_config_disk(row, spec)
        return self._launch_and_wait(row, spec, boot_timeout)

    def _write_config_disk(self, row: dict[str, Any], spec: LaunchSpec) -> None:
        cfg = row["config"]
        _, pub = ensure_client_key(self.keys_dir)
        files: dict[str, bytes | str] = {
            "hostname": row["vm_id"][:63] + "\n",
            "authorized_keys": pub + "\n",
            "ssh_host_ed25519_key": (spec.vm_dir / "ssh_host_key").read_bytes(),
        }
        if cfg.get("env_vars"):
            files["env.sh"] = env_file_text(cfg["env_vars"])
        self.state.add_resource(row["vm_id"], "file", str(spec.vm_dir / "config.tar"))
        build_config_disk(spec.vm_dir / "config.tar", files, {"vm_id": row["vm_id"]})

    def _launch_and_wait(self, row: dict[str, Any], spec: LaunchSpec, boot_timeout: float) -> VMInfo:
        vm_id = row["vm_id"]
        backend = self.backend_for(row["backend"])
        for s in (spec.control_socket, *agent_sockets(spec)):
            self.state.add_resource(vm_id, "socket", str(s))
        offset = spec.serial_log.stat().st_size if spec.serial_log.exists() else 0
        self.state.update_vm(vm_id, error=None)
        if spec.memory is None and row["backend"] == "qemu":
            from smolvm.snapshots import boot_memory

            spec.memory = boot_memory(self, vm_id)  # shared RAM file: fast snapshots
        try:
            pid = backend.launch(spec)
        except SmolVMError as exc:
            self.state.update_vm(vm_id, status=VMState.ERROR.value, error=str(exc))
            raise
        if spec.memory is not None and spec.memory.unlink and spec.memory.path is not None:
            self.state.remove_resource("file", str(spec.memory.path))  # unlinked by launch()
        token = procs.process_token(pid)
        self.state.add_resource(vm_id, "process", token)
        self.state.update_vm(vm_id, status=VMState.RUNNING.value, pid=pid, started_at=time.time())
        if spec.incoming is None:
            self._wait_ready(vm_id, spec, pid, token, offset, boot_timeout)
        return self.get(vm_id)

    def _wait_ready(self, vm_id: str, spec: LaunchSpec, pid: int, token: str, offset: int,
                    timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(spec.serial_log, "rb") as f:
                    f.seek(offset)
                    if READY_MARKER in f.read():
                        return
            except FileNotFoundError:
                pass
            if not procs.is_alive(pid, token):
                tail = self.serial_tail(vm_id)
                self.state.update_vm(vm_id, status=VMState.ERROR.value, pid=None,
                                     error="VM process exited during boot")
                raise BackendError(f"VM {vm_id} exited during boot. Serial console tail:\n{tail}")
            if time.monotonic() >= deadline:
                procs.kill(pid, token)
                self.state.update_vm(vm_id, status=VMState.ERROR.value, pid=None,
                                     error=f"boot timed out after {timeout} s")
                raise OperationTimeoutError(
                    f"VM {vm_id} did not become ready within {timeout} s (accelerator "
                    f"{spec.accel}); raise boot_timeout or see `smolvm logs {vm_id}`.\n"
                    f"{self.serial_tail(vm_id)}", timeout, {"vm_id": vm_id})
            time.sleep(0.005)

    def serial_tail(self, vm_id: str, n: int = 4000) -> str:
        p = self.vm_dir(vm_id) / "serial.log"
        try:
            data = p.read_bytes()[-n:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    # ------------------------------------------------------------------ stop / delete
    def stop(self, vm_id: str, timeout: float = 10.0) -> VMInfo:
        """Shut the guest down cleanly; kill the VMM after ``timeout`` seconds."""
        row = self.state.get_vm(vm_id)
        if VMState(row["status"]) in (VMState.RUNNING, VMState.PAUSED):
            self._halt(row, graceful=True, timeout=timeout)
        self.state.update_vm(vm_id, status=VMState.STOPPED.value, pid=None)
        return self.get(vm_id)

    def _halt(self, row: dict[str, Any], *, graceful: bool, timeout: float) -> None:
        vm_id, pid = row["vm_id"], row["pid"]
        if (handed := self._handoff.pop(vm_id, None)) is not None:
            handed.close()
        token = next((r["value"] for r in self.state.resources(vm_id, "process")), None)
        spec = self.spec(row)
        if graceful and procs.is_alive(pid, token):
            if VMState(row["status"]) is VMState.PAUSED:
                self._try(lambda: self.backend_for(row["backend"]).resume(spec))
            self.host.request_guest_shutdown(row, spec)
            if not procs.wait_gone(pid, timeout, token):
                log.warning("VM %s did not shut down within %.1f s; killing it", vm_id, timeout)
        if procs.is_alive(pid, token):
            procs.kill(pid, token)
            procs.wait_gone(pid, 5.0, token)
        for r in self.state.resources(vm_id, "process"):
            self.state.remove_resource("process", r["value"])
        for s in socket_files(spec):
            s.unlink(missing_ok=True)

    @staticmethod
    def _try(fn: Any) -> None:
        try:
            fn()
        except SmolVMError as exc:
            log.debug("ignored: %s", exc)

    def delete(self, vm_id: str) -> None:
        """Remove the VM: its process, forwards, state row and disk (unless retained)."""
        row = self.state.get_vm(vm_id)
        if row["pid"]:
            self._halt(row, graceful=False, timeout=0)
        keep = bool(row["config"].get("retain_disk_on_delete"))
        self._purge(vm_id, keep_disk=keep)

    def _purge(self, vm_id: str, *, keep_disk: bool) -> None:
        try:
            row = self.state.get_vm(vm_id)
            net = NetworkInfo.model_validate(row["network"])
        except VMNotFoundError:
            net = NetworkInfo(mode="none")
        for r in self.state.resources(vm_id):
            self._remove_resource(r, keep_disk=keep_disk)
        self.network.release(vm_id, net)
        self.state.delete_vm(vm_id)

    def _remove_resource(self, r: dict[str, Any], *, keep_disk: bool) -> None:
        kind, value = r["kind"], r["value"]
        if kind == "process":
            pid = int(value.split(":")[0])
            procs.kill(pid, value)
            procs.wait_gone(pid, 5.0, value)
        elif kind in ("socket", "file"):
            Path(value).unlink(missing_ok=True)
            if kind == "socket":
                agent_lock_path(Path(value)).unlink(missing_ok=True)  # agent ports' lock files
        elif kind == "disk":
            if keep_disk:
                return
            Path(value).unlink(missing_ok=True)
        elif kind == "dir":
            shutil.rmtree(value, ignore_errors=True)
        elif kind in ("tap", "nft", "lease"):
            from smolvm.network.tap import remove_resource

            remove_resource(kind, value)
        self.state.remove_resource(kind, value)

    # ------------------------------------------------------------------ queries
    def get(self, vm_id: str) -> VMInfo:
        return _info(self.state.get_vm(vm_id))

    def list_vms(self, status: VMState | None = None) -> list[VMInfo]:
        return [_info(r) for r in self.state.list_vms(VMState(status).value if status else None)]

    def reconcile(self) -> list[str]:
        """Mark VMs whose VMM died as ERROR (returned) and remove resources of vanished VMs."""
        stale = []
        for row in self.state.list_vms():
            if VMState(row["status"]) not in (VMState.RUNNING, VMState.PAUSED):
                continue
            token = next((r["value"] for r in self.state.resources(row["vm_id"], "process")), None)
            if not procs.is_alive(row["pid"], token):
                stale.append(row["vm_id"])
                self.state.update_vm(row["vm_id"], status=VMState.ERROR.value, pid=None,
                                     error="VM process is gone (found by reconcile)")
                spec = self.spec(row)
                for s in socket_files(spec):
                    s.unlink(missing_ok=True)
                for s in (spec.control_socket, *agent_sockets(spec)):
                    self.state.remove_resource("socket", str(s))
                if token:
                    self.state.remove_resource("process", token)
        from smolvm.pool import reap_orphans
        from smolvm.snapshots import gc_incomplete

        reap_orphans(self)  # pool VMs whose owning process died
        gc_incomplete(self)  # snapshots a crash left half-written
        known = {r["vm_id"] for r in self.state.list_vms()}
        for r in self.state.resources():
            if r["vm_id"] not in known:
                self._remove_resource(r, keep_disk=False)
        return stale

    # ------------------------------------------------------------------ channels & misc
    def transport(self, vm_id: str, channel: str) -> Transport:
        """A command channel to a running VM: "agent" (guest agent) or "ssh"."""
        if channel == "agent" and (handed := self._handoff.pop(vm_id, None)) is not None:
            return handed
        row = self.state.get_vm(vm_id)
        spec = self.spec(row)
        if channel == "agent":
            from smolvm.transports.agent import AgentTransport

            vsock = 52 if row["backend"] == "firecracker" else None
            return AgentTransport(agent_sockets(spec), vsock_port=vsock)
        if channel != "ssh":
            raise ValidationError(f"comm_channel must be auto, agent or ssh, got {channel!r}",
                                  field="comm_channel")
        from smolvm.transports.ssh import SSHTransport

        net = NetworkInfo.model_validate(row["network"])
        if net.mode == "user" and net.ssh_host_port:
            host, port = "127.0.0.1", net.ssh_host_port
        elif net.mode == "tap" and net.guest_ip:
            host, port = net.guest_ip, 22
        else:
            raise CommandExecutionUnavailableError(
                f"VM {vm_id} has no network, so no SSH", "use comm_channel='agent' or network='user'",
                vm_id)
        key, _ = ensure_client_key(self.keys_dir)
        return SSHTransport(host, port, key_path=key, host_key_alias=host_key_alias(vm_id),
                            host_public_key=row["host_key"], vm_id=vm_id)

    def set_config_env(self, vm_id: str, env: dict[str, str]) -> None:
        """Remember env vars in state so the next boot's config disk carries them."""
        row = self.state.get_vm(vm_id)
        cfg = dict(row["config"])
        cfg["env_vars"] = dict(env)
        self.state.update_vm(vm_id, config=cfg)

    def pause(self, vm_id: str) -> VMInfo:
        row = self.state.get_vm(vm_id)
        if VMState(row["status"]) is not VMState.RUNNING:
            raise InvalidStateError(f"cannot pause VM {vm_id!r}: it is {row['status']}, not running")
        self.backend_for(row["backend"]).pause(self.spec(row))
        self.state.update_vm(vm_id, status=VMState.PAUSED.value)
        return self.get(vm_id)

    def resume(self, vm_id: str, *, transport: Transport | None = None) -> VMInfo:
        """Continue a paused VM, then reset its clock and reseed its RNG (through
        ``transport`` when the caller holds the agent channel). Resuming an idle pool VM
        takes it out of its pool."""
        row = self.state.get_vm(vm_id)
        if VMState(row["status"]) is not VMState.PAUSED:
            raise InvalidStateError(f"cannot resume VM {vm_id!r}: it is {row['status']}, not paused")
        if row["pool"] and not self.state.claim_vm(vm_id):
            raise InvalidStateError(f"VM {vm_id!r} was just handed out by its pool")
        self.backend_for(row["backend"]).resume(self.spec(row))
        self.state.update_vm(vm_id, status=VMState.RUNNING.value)
        if row["backend"] == "qemu":
            from smolvm.snapshots import refresh_guest

            refresh_guest(self, vm_id, transport)  # type: ignore[arg-type]
        return self.get(vm_id)

    # ------------------------------------------------------------------ snapshots & pools
    def snapshot(self, vm_id: str, name: str, *, resume: bool = True) -> Any:
        """Snapshot a running/paused VM (memory, devices, disk) as ``name``: a SnapshotInfo."""
        from smolvm.snapshots import create_snapshot

        return create_snapshot(self, vm_id, name, resume=resume, transport=self._handoff.get(vm_id))  # type: ignore[arg-type]

    def restore_snapshot(self, name: str, *, vm_id: str | None = None, boot_timeout: float = 30.0,
                         **overrides: Any) -> VMInfo:
        """A new running VM restored from snapshot ``name`` (its own disk overlay, ports,
        identity). ``overrides``: env_vars, port_forwards, comm_channel, retain_disk_on_delete."""
        from smolvm.snapshots import create_clone

        info = create_clone(self, name, vm_id=vm_id, **overrides)
        try:
            return self.start(info.vm_id, boot_timeout=boot_timeout)
        except BaseException:
            self.delete(info.vm_id)
            raise

    def list_snapshots(self) -> list[Any]:
        from smolvm.snapshots import list_snapshots

        return list_snapshots(self)

    def get_snapshot(self, name: str) -> Any:
        from smolvm.snapshots import get_snapshot

        return get_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        from smolvm.snapshots import delete_snapshot

        delete_snapshot(self, name)

    def pool(self, size: int = 1, config: VMConfig | None = None, *, snapshot: str | None = None,
             **kw: Any) -> Any:
        """A :class:`smolvm.pool.WarmPool` of ``size`` paused, restored VMs (refilled in the
        background). Close it (or use ``with``) to drain it."""
        from smolvm.pool import WarmPool

        return WarmPool(size, config, snapshot=snapshot, data_dir=self.data_dir,
                        socket_dir=self.socket_dir, **kw)

    # ------------------------------------------------------------------ SSH
    def get_ssh_commands(self, vm_id: str, *, ssh_user: str = "root", key_path: str | Path | None = None,
                         public_host: str | None = None) -> dict[str, str]:
        """Ready-to-run ``ssh`` commands with the VM's host key pinned."""
        info = self.get(vm_id)
        key = Path(key_path).expanduser() if key_path else self.keys_dir / "id_ed25519"
        kh = self.vm_dir(vm_id) / "known_hosts"
        opts = ["-i", str(key), "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                "-o", f"HostKeyAlias={host_key_alias(vm_id)}", "-o", "IdentitiesOnly=yes"]
        q = shlex.join
        out = {}
        if info.network.guest_ip:
            out["private_ip"] = q(["ssh", *opts, f"{ssh_user}@{info.network.guest_ip}"])
        if info.network.ssh_host_port:
            out["localhost_port"] = q(["ssh", *opts, "-p", str(info.network.ssh_host_port),
                                       f"{ssh_user}@127.0.0.1"])
            if public_host:
                out["public"] = q(["ssh", *opts, "-p", str(info.network.ssh_host_port),
                                   f"{ssh_user}@{public_host}"])
        return out


def _progress_to_stderr(msg: str) -> None:
    print(f"smolvm: {msg}", file=sys.stderr, flush=True)


def _is_qcow2(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def _stored_config(cfg: dict[str, Any]) -> VMConfig:
    """The config as stored; not re-validated (its image files may since have been removed)."""
    data = {k: (Path(v) if k.endswith("_path") and v else v) for k, v in cfg.items()}
    data["port_forwards"] = {int(h): int(g) for h, g in (cfg.get("port_forwards") or {}).items()}
    return VMConfig.model_construct(**data)


def _info(row: dict[str, Any]) -> VMInfo:
    cfg = row["config"]
    return VMInfo(
        vm_id=row["vm_id"], status=VMState(row["status"]), config=VMConfig.model_construct(**{
            k: (Path(v) if k.endswith("_path") and v else v) for k, v in cfg.items()}),
        network=NetworkInfo.model_validate(row["network"]), backend=row["backend"], pid=row["pid"],
        accelerator=row["accelerator"], accelerator_reason=row["accelerator_reason"],
        created_at=row["created_at"], started_at=row["started_at"],
        vm_dir=row["vm_dir"], disk_path=row["disk_path"], error=row["error"], snapshot=row["snapshot"],
        pool=row.get("pool"),
    )
