"""Firecracker backend: one ``firecracker`` process per VM, configured over its API socket.

Lifecycle (see Firecracker's swagger spec, ``src/firecracker/swagger/firecracker.yaml``):

* boot:    ``firecracker --api-sock <control_socket> --id <id>`` started detached (own
  session), then ``PUT /logger``, ``PUT /machine-config``, ``PUT /boot-source``,
  ``PUT /drives/{id}`` per disk, ``PUT /network-interfaces/eth0`` (TAP only),
  ``PUT /vsock`` and finally ``PUT /actions {InstanceStart}``.
* ``request_shutdown`` → ``PUT /actions {SendCtrlAltDel}``; ``pause``/``resume`` →
  ``PATCH /vm``.

Snapshots are not supported on this backend (``supports_snapshots`` is False): SmolVM's
snapshots, clones and pools build on qcow2 overlays and a guest-RAM file, which
Firecracker has no equivalent for here.

Files: Firecracker writes the guest serial console to its stdout, so stdout is appended to
``spec.serial_log``; stderr goes to ``spec.process_log`` (or the serial log); the VMM's own
log (``PUT /logger``) goes to ``<vm_dir>/firecracker.log``.

Firecracker has no user-mode networking and no software CPU emulation: it needs a usable
KVM (checked with :func:`smolvm.host.kvm.probe_kvm`) and TAP devices for networking.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smolvm.backends.base import Backend, DiskSpec, LaunchSpec
from smolvm.backends.firecracker_api import UNIX_PATH_MAX, FirecrackerAPI, wait_for_socket
from smolvm.exceptions import BackendError, ImageError, NetworkError, SnapshotError
from smolvm.host.kvm import KVMProbe, probe_kvm, probe_kvm_cached

__all__ = [
    "FirecrackerBackend",
    "vsock_connect",
    "firecracker_instance_id",
    "ENV_BIN",
    "GUEST_CID",
    "AGENT_VSOCK_PORT",
]

log = logging.getLogger(__name__)

ENV_BIN = "SMOLVM_FIRECRACKER_BIN"
#: Guest CID of every VM (each VM has its own vsock device and UDS, so they may share it).
GUEST_CID = 3
#: The guest agent listens on this vsock port.
AGENT_VSOCK_PORT = 52
#: The one network interface a SmolVM guest has.
IFACE_ID = "eth0"
RELEASES_URL = "https://github.com/firecracker-microvm/firecracker/releases"

_API_ID_RE = re.compile(r"[^A-Za-z0-9_]")
_INSTANCE_ID_RE = re.compile(r"[^A-Za-z0-9-]")

# Keep a waiter thread per child so an exited VMM is reaped (no zombie that would still
# look alive to os.kill(pid, 0)) while this Python process lives.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait()
    finally:
        with _children_lock:
            _children.pop(proc.pid, None)


def firecracker_instance_id(vm_id: str) -> str:
    """``--id`` value: Firecracker accepts 1-64 characters of ``[A-Za-z0-9-]``."""
    return (_INSTANCE_ID_RE.sub("-", vm_id) or "smolvm")[:64]


def api_resource_id(raw: str) -> str:
    """Drive / interface ids: Firecracker accepts only ``[A-Za-z0-9_]``."""
    return _API_ID_RE.sub("_", raw) or "_"


def vsock_connect(uds_path: Path | str, port: int = AGENT_VSOCK_PORT, timeout: float = 5.0) -> socket.socket:
    """Open a host→guest vsock stream through Firecracker's UDS (``CONNECT <port>\\n``).

    Firecracker answers ``OK <host_port>\\n`` once the guest accepted; it closes the
    connection when nothing listens on ``port`` in the guest. Returns the connected socket
    (blocking, timeout cleared) or raises :class:`BackendError`.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(uds_path))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                break
            line += chunk
            if len(line) > 64:
                break
    except OSError as exc:
        s.close()
        raise BackendError(
            f"vsock connect to guest port {port} via {uds_path} failed: {exc}",
            {"uds_path": str(uds_path), "port": port},
        ) from None
    if not line.startswith(b"OK "):
        s.close()
        raise BackendError(
            f"the guest is not accepting vsock connections on port {port} "
            f"(Firecracker answered {line!r}); is the guest agent running?",
            {"uds_path": str(uds_path), "port": port, "answer": line.decode("latin-1")},
        )
    s.settimeout(None)
    return s


def _remove_stale_socket(path: Path, what: str) -> None:
    """Firecracker refuses to bind an existing path: drop a leftover socket, refuse others."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        # Only remove it when nobody listens (a live VM may own it).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)
            return
        finally:
            s.close()
        raise BackendError(
            f"{what} {path} is in use by a running process (another VM with the same "
            "socket path?); stop it or choose another path",
            {"path": str(path)},
        )
    raise BackendError(
        f"{what} {path} exists and is not a socket; Firecracker needs to create it. "
        "Remove the file or choose another path",
        {"path": str(path)},
    )


def _tail(path: Path | None, lines: int = 8) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class FirecrackerBackend(Backend):
    """Runs VMs with Firecracker.

    Args:
        binary: path of the ``firecracker`` executable; default ``$SMOLVM_FIRECRACKER_BIN``,
            then ``firecracker`` on ``PATH``.
        cache_dir: where the KVM probe caches its verdict (per host boot); ``None`` probes
            every time ``check_prerequisites`` runs.
        kvm_probe: replaces the KVM probe (tests, or a manager that probed already).
        api_timeout: seconds per API request.
        socket_wait: seconds to wait for the API socket after starting the process.
    """

    name = "firecracker"
    disk_format = "raw"
    agent_ports = 1  # one vsock UDS that takes any number of clients
    agent_vsock_port = AGENT_VSOCK_PORT
    network_modes = frozenset({"tap", "none"})

    def __init__(
        self,
        binary: str | Path | None = None,
        *,
        cache_dir: Path | None = None,
        kvm_probe: Callable[[], KVMProbe] | None = None,
        api_timeout: float = 10.0,
        socket_wait: float = 5.0,
    ) -> None:
        self._binary = str(binary) if binary is not None else None
        self.cache_dir = cache_dir
        self._kvm_probe = kvm_probe
        self.api_timeout = api_timeout
        self.socket_wait = socket_wait

    # -- discovery -----------------------------------------------------------------------

    def find_binary(self) -> str | None:
        """Path of the firecracker executable, or None."""
        cand = self._binary or os.environ.get(ENV_BIN)
        if cand:
            p = Path(cand).expanduser()
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
            found = shutil.which(cand) if os.sep not in cand else None
            return found
        return shutil.which("firecracker")

    def probe(self) -> KVMProbe:
        if self._kvm_probe is not None:
            return self._kvm_probe()
        if self.cache_dir is not None:
            return probe_kvm_cached(Path(self.cache_dir))
        return probe_kvm()

    def check_prerequisites(self) -> list[str]:
        problems: list[str] = []
        if platform.system() != "Linux":
            problems.append(
                f"Firecracker runs only on Linux (this is {platform.system()}); "
                "use backend='qemu' on this host"
            )
        arch = platform.machine()
        if arch not in ("x86_64", "aarch64"):
            problems.append(f"Firecracker supports x86_64 and aarch64 hosts, not {arch}")
        if self.find_binary() is None:
            configured = self._binary or os.environ.get(ENV_BIN)
            if configured:
                problems.append(
                    f"firecracker binary {configured!r} (from "
                    f"{'the backend argument' if self._binary else ENV_BIN}) does not exist or "
                    f"is not executable: fix the path or `chmod +x {configured}`"
                )
            else:
                problems.append(
                    "firecracker binary not found on PATH: download the release archive for "
                    f"{arch} from {RELEASES_URL}, install `release-*/firecracker-*-{arch}` as "
                    f"/usr/local/bin/firecracker (chmod +x), or set {ENV_BIN}=/path/to/firecracker"
                )
        kvm = self.probe()
        if not kvm.usable:
            if kvm.forced:
                problems.append(
                    f"Firecracker needs KVM, but the accelerator is {kvm.reason}: unset "
                    "SMOLVM_ACCEL or use backend='qemu'"
                )
            elif not kvm.present:
                problems.append(
                    f"Firecracker needs KVM: {kvm.reason.replace('; using TCG', '')}. "
                    "Without KVM use backend='qemu' (TCG emulation)"
                )
            else:
                problems.append(
                    f"Firecracker needs a usable KVM: {kvm.reason.replace('; using TCG', '')}. "
                    "Firecracker has no software fallback: use backend='qemu' (TCG) on this "
                    "host, or SMOLVM_ACCEL=kvm to override the probe"
                )
        return problems

    # -- launch --------------------------------------------------------------------------

    def log_path(self, spec: LaunchSpec) -> Path:
        """Firecracker's own log (``PUT /logger``)."""
        return Path(spec.vm_dir) / "firecracker.log"

    def _validate(self, spec: LaunchSpec) -> None:
        if spec.net is not None:
            if spec.net.mode == "user":
                raise NetworkError(
                    "Firecracker has no user-mode networking (QEMU slirp): use network='tap' "
                    "(TAP device + NAT, needs root), network='none' (the agent still works over "
                    "vsock), or backend='qemu' for rootless user-mode networking",
                    {"vm_id": spec.vm_id, "mode": spec.net.mode},
                )
            if spec.net.mode == "tap" and not spec.net.tap_device:
                raise NetworkError(
                    "tap networking needs NetSpec.tap_device (the host TAP device name)",
                    {"vm_id": spec.vm_id},
                )
        for d in spec.disks:
            if d.format != "raw":
                raise BackendError(
                    f"disk {d.id} ({d.path}) is {d.format}, but Firecracker reads raw images "
                    f"only: convert it with `qemu-img convert -O raw {d.path} {d.path}.raw`, or "
                    "use backend='qemu'",
                    {"vm_id": spec.vm_id, "disk": str(d.path), "format": d.format},
                )
        ids = [api_resource_id(d.id) for d in spec.disks]
        if len(set(ids)) != len(ids):
            raise BackendError(
                f"disk ids {[d.id for d in spec.disks]} collide once mapped to Firecracker's "
                "[A-Za-z0-9_] ids; give each disk a distinct alphanumeric id",
                {"vm_id": spec.vm_id},
            )
        if not 1 <= spec.vcpus <= 32:
            raise BackendError(f"Firecracker supports 1-32 vCPUs, got {spec.vcpus}", {"vm_id": spec.vm_id})
        for label, p in (("control socket", spec.control_socket), ("agent socket", spec.agent_socket)):
            if len(os.fsencode(str(p))) >= UNIX_PATH_MAX:
                raise BackendError(
                    f"{label} path is too long for a UNIX socket ({len(str(p))} bytes, max "
                    f"{UNIX_PATH_MAX - 1}): {p}; use a shorter socket/data directory",
                    {"vm_id": spec.vm_id, "path": str(p)},
                )

    def _start_process(self, spec: LaunchSpec) -> subprocess.Popen[bytes]:
        binary = self.find_binary()
        if binary is None:
            raise BackendError(
                "firecracker binary not found: install it on PATH or set "
                f"{ENV_BIN}=/path/to/firecracker (see `smolvm doctor`)",
                {"vm_id": spec.vm_id},
            )
        vm_dir = Path(spec.vm_dir)
        vm_dir.mkdir(parents=True, exist_ok=True)
        Path(spec.control_socket).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.agent_socket).parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(Path(spec.control_socket), "API socket")
        argv = [binary, "--api-sock", str(spec.control_socket),
                "--id", firecracker_instance_id(spec.vm_id)]  # fmt: skip
        serial = open(spec.serial_log, "ab")
        errlog = open(spec.process_log, "ab") if spec.process_log else serial
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=serial,
                stderr=errlog,
                cwd=str(vm_dir),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot start {binary}: {exc}", {"vm_id": spec.vm_id, "argv": argv}) from None
        finally:
            serial.close()
            if errlog is not serial:
                errlog.close()
        if spec.on_spawn is not None:
            spec.on_spawn(proc.pid)
        with _children_lock:
            _children[proc.pid] = proc
        threading.Thread(target=_reap, args=(proc,), name=f"fc-reap-{proc.pid}", daemon=True).start()
        log.debug("started %s (pid %d)", " ".join(argv), proc.pid)
        return proc

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _api(self, spec: LaunchSpec) -> FirecrackerAPI:
        return FirecrackerAPI(spec.control_socket, timeout=self.api_timeout)

    def launch(self, spec: LaunchSpec) -> int:
        self._validate(spec)
        if spec.incoming is not None:
            raise SnapshotError(
                "the firecracker backend does not restore snapshots; use backend='qemu'",
                {"vm_id": spec.vm_id},
            )
        for p, what in ((spec.kernel, "kernel"), (spec.initrd, "initrd")):
            if p is not None and not Path(p).is_file():
                raise ImageError(f"{what} {p} does not exist", {"vm_id": spec.vm_id, "path": str(p)})
        _remove_stale_socket(Path(spec.agent_socket), "agent socket")

        proc = self._start_process(spec)
        try:
            if not wait_for_socket(spec.control_socket, self.socket_wait, alive=lambda: proc.poll() is None):
                code = proc.poll()
                where = spec.process_log or spec.serial_log
                state = (
                    f"exited with code {code}"
                    if code is not None
                    else (f"did not open its API socket within {self.socket_wait:g} s")
                )
                raise BackendError(
                    f"firecracker {state}. Last lines of {where}:\n{_tail(where)}",
                    {"vm_id": spec.vm_id, "pid": proc.pid, "returncode": code},
                )
            api = self._api(spec)
            self._configure_logger(api, spec)
            self._boot(api, spec)
        except BaseException:
            self._kill(proc)
            raise
        return proc.pid

    def _configure_logger(self, api: FirecrackerAPI, spec: LaunchSpec) -> None:
        path = self.log_path(spec)
        # Firecracker writes from offset 0 (no O_APPEND): start each launch with a fresh file.
        path.write_bytes(b"")
        api.put("/logger", {"log_path": str(path), "level": "Info", "show_level": True})

    def _drive_body(self, d: DiskSpec) -> dict[str, Any]:
        return {
            "drive_id": api_resource_id(d.id),
            "path_on_host": str(d.path),
            # Our stage-1 initrd finds the root file system by content, so no drive is
            # Firecracker's "root device" (which would only add root=/dev/vda to the cmdline).
            "is_root_device": False,
            "is_read_only": bool(d.read_only),
        }

    def _boot(self, api: FirecrackerAPI, spec: LaunchSpec) -> None:
        api.put("/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib})
        boot: dict[str, Any] = {"kernel_image_path": str(spec.kernel), "boot_args": spec.boot_args}
        if spec.initrd is not None:
            boot["initrd_path"] = str(spec.initrd)
        api.put("/boot-source", boot)
        for d in spec.disks:
            body = self._drive_body(d)
            api.put(f"/drives/{body['drive_id']}", body)
        if spec.net is not None:
            api.put(
                f"/network-interfaces/{IFACE_ID}",
                {"iface_id": IFACE_ID, "guest_mac": spec.net.mac, "host_dev_name": spec.net.tap_device},
            )
        api.put("/vsock", {"guest_cid": GUEST_CID, "uds_path": str(spec.agent_socket)})
        api.put("/actions", {"action_type": "InstanceStart"})

    # -- control -------------------------------------------------------------------------

    def request_shutdown(self, spec: LaunchSpec) -> None:
        if "i8042.nokbd" in spec.boot_args:
            log.warning(
                "VM %s: boot_args contain i8042.nokbd, so the guest has no keyboard controller "
                "and ignores Ctrl-Alt-Del; it will not shut down on request", spec.vm_id,
            )  # fmt: skip
        self._api(spec).put("/actions", {"action_type": "SendCtrlAltDel"})

    def pause(self, spec: LaunchSpec) -> None:
        self._api(spec).patch("/vm", {"state": "Paused"})

    def resume(self, spec: LaunchSpec) -> None:
        self._api(spec).patch("/vm", {"state": "Resumed"})

    def status(self, spec: LaunchSpec) -> str:
        """ "prelaunch" | "running" | "paused" (QMP-style words, as the QEMU backend says)."""
        state = self._api(spec).get("/").get("state", "")
        return {"Not started": "prelaunch", "Running": "running", "Paused": "paused"}.get(
            state, state.lower()
        )
