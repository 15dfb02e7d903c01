"""QEMU backend: ``-M microvm`` with ACPI, a PVH vmlinux, virtio-mmio devices, QMP control.

Flags follow the measurements in the platform notes. The process is started with
``-daemonize`` so start-up errors surface synchronously while the VM outlives us.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolvm.backends.base import Backend, LaunchSpec, agent_sockets
from smolvm.exceptions import BackendError, NetworkError, OperationTimeoutError
from smolvm.network import sandbox

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU_BIN = "qemu-system-x86_64"
#: The unprivileged user QEMU drops to when SmolVM runs as root (created by scripts/setup.sh).
VMM_USER_DEFAULT = "smolvm-vmm"


#: The guest CPU under TCG: QEMU's default model plus ARAT (the local APIC timer keeps
#: running in idle). Without ARAT the guest kernel marks its only timer C3STOP, finds no
#: broadcast timer on microvm and stays in periodic mode: 250 timer interrupts a second,
#: every one emulated, so each idle sandbox cost ~4% of a core. With it the kernel goes
#: tickless (NO_HZ_IDLE, high-res timers) and an idle guest wakes ~10 times a second.
TCG_CPU = "qemu64,+arat"
#: What QEMU runs without ``-cpu`` (snapshots taken before the model was recorded).
QEMU_DEFAULT_CPU = "qemu64"


def guest_cpu(spec: LaunchSpec) -> str | None:
    """The ``-cpu`` model a TCG launch of ``spec`` uses (None under KVM: ``host``)."""
    return None if spec.accel == "kvm" else spec.cpu or TCG_CPU


def vmm_user(spec: LaunchSpec | None = None) -> str | None:
    """The user QEMU runs as after it has opened its files, or None (it stays as it was
    started): only when we are root, the user exists (``SMOLVM_VMM_USER``, "" disables),
    and the VM has no 9p shares (QEMU reads and writes those host dirs at run time, with
    its own uid)."""
    name = os.environ.get("SMOLVM_VMM_USER", VMM_USER_DEFAULT)
    if not name or os.geteuid() != 0 or (spec is not None and spec.shares):
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BIN)


class QMP:
    """Synchronous QMP session (qemu.qmp's legacy sync client) with errors mapped to ours."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._qmp: QEMUMonitorProtocol | None = None

    def __enter__(self) -> QMP:
        # qemu.qmp brings asyncio (~30 ms of `import smolvm`); only QMP sessions need it.
        from qemu.qmp import QMPError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + self.timeout
        while True:
            q = QEMUMonitorProtocol(str(self.path))
            try:
                q.connect(negotiate=True)
                break
            except (QMPError, OSError) as exc:
                q.close()
                if time.monotonic() > deadline:
                    raise BackendError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
                time.sleep(0.01)
        q.settimeout(self.timeout)
        self._qmp = q
        return self

    def __exit__(self, *exc: object) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
            self._qmp = None

    def pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU as ``name`` (SCM_RIGHTS + ``getfd``): migration streams go
        through file descriptors, so QEMU never needs to spawn a shell (``exec:``) and can
        run with ``-sandbox spawn=deny``."""
        from qemu.qmp import QMPError  # loaded by __enter__ already

        assert self._qmp is not None
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise BackendError(f"passing a file descriptor to QEMU failed: {exc!r}") from exc
        self.execute("getfd", fdname=name)

    def execute(self, cmd: str, **args: Any) -> Any:
        from qemu.qmp import ExecuteError, QMPError  # loaded by __enter__ already

        assert self._qmp is not None
        try:
            return self._qmp.cmd(cmd, **args)
        except ExecuteError as exc:
            raise BackendError(f"QMP {cmd} failed: {exc.error.error.desc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise BackendError(f"QMP {cmd} failed: {exc!r}") from exc


def qmp(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """One QMP command over a plain socket: ~0.4 ms, against ~2-8 ms through qemu.qmp's
    asyncio client (it matters for pool hand-outs, which are one ``cont``)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.connect(str(path))
            break
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise BackendError(f"cannot connect to QMP socket {path}: {exc}") from exc
            time.sleep(0.01)
    f = None
    try:
        f = sock.makefile("rwb")

        def reply() -> dict:
            while True:
                line = f.readline()
                if not line:
                    raise BackendError(f"QMP {cmd}: QEMU closed the monitor")
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg

        f.readline()  # greeting
        f.write(b'{"execute":"qmp_capabilities"}\n')
        f.flush()
        reply()
        f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})}).encode() + b"\n")
        f.flush()
        msg = reply()
    except (OSError, ValueError) as exc:
        raise BackendError(f"QMP {cmd} failed: {exc!r}") from exc
    finally:
        if f is not None:
            f.close()
        sock.close()
    if "error" in msg:
        raise BackendError(f"QMP {cmd} failed: {msg['error'].get('desc', msg['error'])}")
    return msg["return"]


def _agent_ports(spec: LaunchSpec) -> list[str]:
    """One virtio-serial port + chardev socket server per agent port. Port 0 keeps the name
    ``smolvm.agent`` (agents of older images serve only that one), the others are
    ``smolvm.agent.<i>``. A snapshot's restore repeats them (same spec, same argv)."""
    a: list[str] = []
    for i, sock in enumerate(agent_sockets(spec)):
        name = "smolvm.agent" if i == 0 else f"smolvm.agent.{i}"
        a += [
            "-chardev",
            f"socket,id=agent{i},path={sock},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vs0.0,chardev=agent{i},name={name}",
        ]
    return a


class QemuBackend(Backend):
    name = "qemu"
    supports_snapshots = True
    supports_memory_file = True
    selects_accelerator = True
    supports_shares = True

    def check_prerequisites(self) -> list[str]:
        errors = []
        if not qemu_binary():
            errors.append(
                f"{QEMU_BIN} not found: install it with `apt-get install qemu-system-x86 qemu-utils` "
                "(or run scripts/setup.sh)"
            )
        if not shutil.which("qemu-img"):
            errors.append("qemu-img not found: `apt-get install qemu-utils`")
        if not shutil.which("ssh"):
            errors.append("ssh client not found: `apt-get install openssh-client`")
        return errors

    def argv(self, spec: LaunchSpec) -> list[str]:
        binary = qemu_binary()
        if not binary:
            raise BackendError(f"{QEMU_BIN} not found; run `smolvm setup` or apt-get install qemu-system-x86")
        cpu = guest_cpu(spec)
        if cpu is None:
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            # Translation cache: only used pages are resident (idle RSS is the same at 32 and
            # 64 MiB), but at 32 a python3 importing a dozen modules flushed it 8 times and
            # ran ~35% slower than at 64 (1 flush).
            accel = ["-accel", "tcg,tb-size=64", "-cpu", cpu]
        machine = "microvm,acpi=on"
        mem: list[str] = []
        if spec.memory is not None:
            # A named backend (RAMBlock "mem0") so snapshots can share or map guest RAM.
            machine += ",memory-backend=mem0"
            if spec.memory.path is None:
                mem = ["-object", f"memory-backend-ram,id=mem0,size={spec.mem_mib}M"]
            else:
                share = "on" if spec.memory.shared else "off"
                mem = [
                    "-object",
                    f"memory-backend-file,id=mem0,size={spec.mem_mib}M,"
                    f"mem-path={spec.memory.path},share={share}",
                ]
        nice = ["nice", "-n", str(spec.nice)] if spec.nice and shutil.which("nice") else []
        user = vmm_user(spec)
        a = [
            *nice,
            binary,
            "-name",
            f"smolvm-{spec.vm_id}",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-M",
            machine,
            *mem,
            *accel,
            "-m",
            str(spec.mem_mib),
            "-smp",
            str(spec.vcpus),
            "-kernel",
            str(spec.kernel),
            "-append",
            spec.boot_args,
            "-chardev",
            f"file,id=ser0,path={spec.serial_log},append=on",
            "-serial",
            "chardev:ser0",
            "-monitor",
            "none",
            "-qmp",
            f"unix:{spec.control_socket},server=on,wait=off",
            "-device",
            "virtio-serial-device,id=vs0",
            *_agent_ports(spec),
            "-pidfile",
            str(spec.vm_dir / "qemu.pid"),
            # seccomp: no fork/exec, no obsolete or scheduler/resource syscalls. Hence no
            # -daemonize (it forks after the filter is on) and fd: migration for snapshots
            # (see QMP.pass_fd). Privilege changes are denied too, except the one drop of
            # -runas (QEMU 7.2 installs the filter first; after the drop it holds no
            # capability to elevate with).
            "-sandbox",
            f"on,obsolete=deny,elevateprivileges={'allow' if user else 'deny'},spawn=deny,"
            "resourcecontrol=deny",
            *(["-runas", user] if user else []),
        ]
        if spec.initrd:
            a += ["-initrd", str(spec.initrd)]
        for d in spec.disks:
            # A writable disk is opened read-write at start (as root, before -runas): with
            # the default auto-read-only QEMU reopened it by path when a migration ended.
            ro = ",readonly=on" if d.read_only else ",file.auto-read-only=off"
            a += [
                "-drive",
                f"id={d.id},file={d.path},format={d.format},if=none,cache=unsafe{ro}",
                "-device",
                f"virtio-blk-device,drive={d.id}",
            ]
        if spec.net is not None:
            if spec.net.mode == "user":
                fwd = "".join(f",hostfwd=tcp:{_fwd_addr(spec)}:{h}-:{g}" for h, g in spec.net.forwards)
                a += ["-netdev", f"user,id=n0{fwd}"]
            else:
                a += ["-netdev", f"tap,id=n0,ifname={spec.net.tap_device},script=no,downscript=no"]
            a += ["-device", f"virtio-net-device,netdev=n0,mac={spec.net.mac}"]
        for i, sh in enumerate(spec.shares):
            # Writable shares use mapped-xattr: files the guest creates get owner-only host
            # modes (never setuid); its uid/gid/mode live in xattrs. Read-only ones are plain.
            model = "mapped-xattr" if sh.writable else "none,readonly=on"
            path = str(sh.host_path).replace(",", ",,")  # QEMU option escaping
            a += [
                "-fsdev",
                f"local,id=fs{i},path={path},security_model={model},multidevs=remap",
                "-device",
                f"virtio-9p-device,fsdev=fs{i},mount_tag={sh.tag}",
            ]
        if spec.incoming is not None:
            # Capabilities must be set before the stream is read: see start_incoming().
            a += ["-incoming", "defer"]
        return a

    def launch(self, spec: LaunchSpec) -> int:
        pidfile = spec.vm_dir / "qemu.pid"
        pidfile.unlink(missing_ok=True)
        for sock in (spec.control_socket, *agent_sockets(spec)):
            sock.unlink(missing_ok=True)
        argv = self.argv(spec)
        (spec.vm_dir / "qemu.argv").write_text(json.dumps(argv))
        log_path = spec.vm_dir / "qemu.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            if spec.net is not None and spec.net.sandbox is not None:
                proc = sandbox.launch(argv, spec.net.sandbox, stderr=log, on_spawn=spec.on_spawn)
            else:
                # Its own session: a Ctrl-C to the caller's process group never reaches VMs.
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    umask=0o077,  # whatever QEMU creates is ours alone
                )
                if spec.on_spawn is not None:
                    spec.on_spawn(proc.pid)
        # Reap it if it exits while we live (when we exit first, init does).
        threading.Thread(target=proc.wait, name=f"reap-{spec.vm_id}", daemon=True).start()
        try:
            _wait_started(spec, proc, log_path, offset)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            raise
        if spec.memory is not None and spec.memory.unlink and spec.memory.path is not None:
            spec.memory.path.unlink(missing_ok=True)  # QEMU holds it open; freed when it exits
        return proc.pid

    def add_forward(self, spec: LaunchSpec, host_port: int, guest_port: int) -> None:
        _hmp(spec, f"hostfwd_add n0 tcp:{_fwd_addr(spec)}:{int(host_port)}-:{int(guest_port)}")
        if spec.net is not None and spec.net.sandbox is not None:
            try:
                sandbox.add_forward(spec.net.sandbox.api_socket, host_port)
            except NetworkError:
                _hmp(spec, f"hostfwd_remove n0 tcp:{_fwd_addr(spec)}:{int(host_port)}", ok="removed")
                raise

    def remove_forward(self, spec: LaunchSpec, host_port: int) -> None:
        if spec.net is not None and spec.net.sandbox is not None:
            sandbox.remove_forward(spec.net.sandbox.api_socket, host_port)
        _hmp(spec, f"hostfwd_remove n0 tcp:{_fwd_addr(spec)}:{int(host_port)}", ok="removed")

    def request_shutdown(self, spec: LaunchSpec) -> None:
        try:
            qmp(spec.control_socket, "system_powerdown", timeout=2.0)
        except BackendError:
            pass

    def quit(self, spec: LaunchSpec) -> None:
        qmp(spec.control_socket, "quit", timeout=2.0)

    def pause(self, spec: LaunchSpec) -> None:
        qmp(spec.control_socket, "stop")

    def resume(self, spec: LaunchSpec) -> None:
        qmp(spec.control_socket, "cont")

    def status(self, spec: LaunchSpec) -> str:
        return qmp(spec.control_socket, "query-status")["status"]

    def save_state(self, spec: LaunchSpec, state_path: Path, *, ignore_shared: bool = False) -> None:
        """Stop the VM and write its device state (and RAM unless ``ignore_shared`` and the
        RAM is a shared file) to ``state_path``. The VM stays stopped ("postmigrate");
        ``resume`` continues it."""
        tmp = state_path.with_suffix(".tmp")
        with QMP(spec.control_socket, timeout=30) as q:
            q.execute("stop")
            q.execute(
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": bool(ignore_shared)}],
            )
            q.execute("migrate-set-parameters", **{"max-bandwidth": 10 * 1024**3})
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                q.pass_fd(fd, "smolvm-out")
            finally:
                os.close(fd)  # QEMU has its own copy
            q.execute("migrate", uri="fd:smolvm-out")
            deadline = time.monotonic() + 120
            while True:
                info = q.execute("query-migrate")
                st = info.get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise BackendError(f"saving VM state failed: {info.get('error-desc', st)}")
                if time.monotonic() > deadline:
                    raise OperationTimeoutError("saving VM state took over 120 s", 120)
                time.sleep(0.01)
        tmp.rename(state_path)

    def wait_incoming(self, spec: LaunchSpec, timeout: float = 60.0) -> None:
        """After launching with ``incoming``: load the state and wait (the VM stays paused)."""
        self.start_incoming(spec, timeout=timeout, cont=False)

    def start_incoming(self, spec: LaunchSpec, *, timeout: float = 60.0, cont: bool = False) -> None:
        """Feed ``spec.incoming`` to a VM launched with it, wait until loaded; ``cont`` runs it.

        One QMP session for all of it (each connect costs milliseconds)."""
        assert spec.incoming is not None
        deadline = time.monotonic() + timeout
        with QMP(spec.control_socket, timeout=timeout) as q:
            if spec.incoming_ignore_shared:
                q.execute(
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}],
                )
            fd = os.open(spec.incoming, os.O_RDONLY | os.O_CLOEXEC)
            try:
                q.pass_fd(fd, "smolvm-in")
            finally:
                os.close(fd)
            q.execute("migrate-incoming", uri="fd:smolvm-in")
            while True:
                st = q.execute("query-status")["status"]
                if st != "inmigrate":
                    break
                if time.monotonic() > deadline:
                    raise OperationTimeoutError(f"restoring VM state took over {timeout} s", timeout)
                time.sleep(0.002)
            if st not in ("paused", "running", "postmigrate"):
                info = q.execute("query-migrate")
                raise BackendError(
                    f"restoring VM state failed: status {st}, {info.get('error-desc', info.get('status'))}"
                )
            if cont and st != "running":
                q.execute("cont")


def _fwd_addr(spec: LaunchSpec) -> str:
    """Where QEMU's hostfwd listens: 127.0.0.1 on the host, or (sealed) every address of the
    VM's own namespace, which only the uplink's forwards reach."""
    return "" if spec.net is not None and spec.net.sandbox is not None else "127.0.0.1"


def _hmp(spec: LaunchSpec, command: str, ok: str = "") -> None:
    """A monitor command through QMP; QEMU reports errors as text (any text without ``ok``)."""
    out = qmp(spec.control_socket, "human-monitor-command", timeout=5.0, **{"command-line": command})
    if isinstance(out, str) and out.strip() and not (ok and ok in out):
        raise NetworkError(f"QEMU {command.split()[0]}: {out.strip()[:300]}")


def _wait_started(spec: LaunchSpec, proc: subprocess.Popen[bytes], log: Path, offset: int) -> None:
    """Until QEMU answers QMP (initialised: devices, files and sockets open), or fails."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            with open(log, "rb") as f:
                f.seek(offset)
                err = f.read(64 * 1024).decode(errors="replace").strip()
            raise BackendError(
                f"QEMU failed to start VM {spec.vm_id} (exit {proc.returncode}): {err[-1000:]}"
            )
        if spec.control_socket.exists():
            try:
                qmp(spec.control_socket, "query-status", timeout=1.0)
                return
            except BackendError:
                pass
        if time.monotonic() > deadline:
            raise OperationTimeoutError(f"QEMU of VM {spec.vm_id} did not answer QMP within 60 s", 60)
        time.sleep(0.002)
