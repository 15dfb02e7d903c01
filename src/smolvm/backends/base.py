"""The hypervisor-backend interface. The manager decides *what* to run; a backend knows *how*.

A launched VM process must outlive the Python process that started it (any process may
reconnect through the state store), so backends start it in its own session and return
its pid; all later operations go through the VM's control socket (QMP / Firecracker API).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smolvm.exceptions import NetworkError, SnapshotError
from smolvm.network.sandbox import NetSandbox


@dataclass
class DiskSpec:
    path: Path
    format: Literal["qcow2", "raw"] = "qcow2"
    read_only: bool = False
    #: Stable id used as the device id (must be identical for snapshot restore).
    id: str = "d0"


@dataclass
class NetSpec:
    #: "user": QEMU user-mode NAT (rootless); "tap": an existing TAP device.
    mode: Literal["user", "tap"]
    mac: str
    #: user mode: (host_port, guest_port) forwards, always bound on 127.0.0.1.
    forwards: list[tuple[int, int]] = field(default_factory=list)
    tap_device: str | None = None
    #: user mode: the sealed network namespace the VMM runs in (see ``network.sandbox``).
    sandbox: NetSandbox | None = None


@dataclass
class MemorySpec:
    """Guest RAM in a file (QEMU ``memory-backend-file``, RAMBlock id ``mem0``).

    ``shared``: MAP_SHARED, so the file *is* the guest's memory and a snapshot can copy
    it instead of streaming RAM. Otherwise MAP_PRIVATE: the guest gets a copy-on-write
    view of the file (how clones map a snapshot's memory). ``path=None`` is anonymous
    RAM under the same id. ``unlink`` removes the file once the VMM has it open, so the
    memory can never outlive the process.
    """

    path: Path | None = None
    shared: bool = True
    unlink: bool = False


@dataclass
class ShareSpec:
    """A host directory exported to the guest over virtio-9p as ``tag``."""

    tag: str
    host_path: Path
    #: The guest may write through to the host directory.
    writable: bool = False


#: Guest-agent ports of a QEMU VM. QEMU's chardev socket serves one host client at a time,
#: so each process that holds a command channel to a VM takes one port (see
#: :func:`agent_sockets`); this many processes can talk to one VM at once.
AGENT_PORTS = 4


@dataclass
class LaunchSpec:
    """Everything needed to start one VM. Paths are absolute."""

    vm_id: str
    vm_dir: Path
    kernel: Path
    initrd: Path | None
    disks: list[DiskSpec]
    boot_args: str
    vcpus: int
    mem_mib: int
    #: Guest serial console is appended to this file.
    serial_log: Path
    #: Host end of the guest-agent channel (virtio-serial chardev or Firecracker vsock UDS);
    #: port 0 when there are several (:func:`agent_sockets`).
    agent_socket: Path
    #: Control socket (QMP for QEMU, API socket for Firecracker).
    control_socket: Path
    net: NetSpec | None = None
    #: "kvm" | "tcg" — QEMU only; Firecracker always uses KVM.
    accel: str = "tcg"
    #: Guest CPU model under TCG (QEMU ``-cpu``); None: the backend's default
    #: (:data:`smolvm.backends.qemu.TCG_CPU`). A restore repeats its snapshot's.
    cpu: str | None = None
    #: Restore from this saved state instead of booting (see snapshots).
    incoming: Path | None = None
    #: The saved state skipped shared RAM (x-ignore-shared); RAM comes from ``memory``.
    incoming_ignore_shared: bool = False
    #: Guest RAM backing (QEMU); None = QEMU's default anonymous RAM.
    memory: MemorySpec | None = None
    #: Scheduling niceness of the VMM process (background pool refills use > 0).
    nice: int = 0
    #: Backend process stdout/stderr go here.
    process_log: Path | None = None
    #: Virtio-serial agent ports (QEMU; Firecracker's vsock UDS takes many clients: 1).
    agent_ports: int = AGENT_PORTS
    #: Host directories shared into the guest (virtio-9p).
    shares: list[ShareSpec] = field(default_factory=list)
    #: Called with the VMM's pid as soon as it is spawned (before it is waited for), so the
    #: caller records it before anything can interrupt the launch.
    on_spawn: Callable[[int], None] | None = None


def agent_sockets(spec: LaunchSpec) -> list[Path]:
    """Host sockets of the VM's agent ports: ``agent_socket`` (port 0, guest name
    ``smolvm.agent``) then ``<stem>1<suffix>`` ... (``smolvm.agent.1`` ...), e.g.
    ``smolvm-<id>.agent.sock``, ``smolvm-<id>.agent1.sock``."""
    p = Path(spec.agent_socket)
    return [p] + [p.with_name(f"{p.stem}{i}{p.suffix}") for i in range(1, max(spec.agent_ports, 1))]


def agent_lock_path(sock: Path) -> Path:
    """The lock file of one agent port (``<socket>.lock``): a process holds ``flock`` on it
    for as long as it is connected to that port. Removed with the sockets."""
    return sock.with_name(sock.name + ".lock")


def socket_files(spec: LaunchSpec) -> list[Path]:
    """Every file the VM has in the socket directory: control and agent sockets and the
    agent ports' lock files (what stop/delete/reconcile unlink)."""
    agents = agent_sockets(spec)
    extra = [spec.net.sandbox.api_socket] if spec.net and spec.net.sandbox else []
    return [spec.control_socket, *agents, *(agent_lock_path(s) for s in agents), *extra]


class Backend(abc.ABC):
    """One hypervisor. What differs between hypervisors is declared here, so nothing
    outside ``backends/`` compares backend names."""

    name: str = "abstract"
    #: Disk format the VMM reads: thin qcow2 overlays on the image (QEMU) or a raw copy.
    disk_format: Literal["qcow2", "raw"] = "qcow2"
    #: Guest-agent ports per VM (:data:`AGENT_PORTS` virtio-serial ports, each serving one
    #: host client; 1 for a vsock UDS that takes any number of clients).
    agent_ports: int = AGENT_PORTS
    #: The agent's vsock port when it is reached through a vsock UDS, else None.
    agent_vsock_port: int | None = None
    #: Network modes this VMM supports ("user" is rootless user-mode NAT).
    network_modes: frozenset[str] = frozenset({"user", "tap", "none"})
    #: :meth:`save_state` / :meth:`start_incoming` work (snapshots, clones, warm pools and
    #: the default image's boot snapshot need them).
    supports_snapshots: bool = False
    #: Guest RAM can live in a shared file (:class:`MemorySpec`): snapshots then copy
    #: the file instead of streaming RAM.
    supports_memory_file: bool = False
    #: The VMM runs with TCG too, so the host probe picks KVM or TCG per VM.
    selects_accelerator: bool = False
    #: Host directories can be shared into the guest (``LaunchSpec.shares``).
    supports_shares: bool = False

    @abc.abstractmethod
    def check_prerequisites(self) -> list[str]:
        """Human-readable problems that prevent this backend from running (empty = ok)."""

    @abc.abstractmethod
    def launch(self, spec: LaunchSpec) -> int:
        """Start the VM process detached and return its pid. Does not wait for boot.

        With ``spec.incoming`` set the VMM waits for :meth:`start_incoming` instead."""

    @abc.abstractmethod
    def request_shutdown(self, spec: LaunchSpec) -> None:
        """Ask the guest/VMM to shut down (ACPI, Ctrl-Alt-Del, ...). Returns at once."""

    @abc.abstractmethod
    def pause(self, spec: LaunchSpec) -> None: ...

    @abc.abstractmethod
    def resume(self, spec: LaunchSpec) -> None: ...

    def save_state(self, spec: LaunchSpec, state_path: Path, *, ignore_shared: bool = False) -> None:
        """Pause the VM and write its device state (and RAM, unless ``ignore_shared`` and
        the RAM is a shared file) to ``state_path``; the VM's disks are flushed and
        inactive afterwards."""
        raise SnapshotError(f"the {self.name} backend cannot snapshot VMs; use backend='qemu'")

    def start_incoming(self, spec: LaunchSpec, *, timeout: float = 60.0, cont: bool = False) -> None:
        """Load ``spec.incoming`` into a VM launched with it (``timeout`` seconds), then
        run it when ``cont`` (else it stays paused)."""
        raise SnapshotError(f"the {self.name} backend cannot restore snapshots; use backend='qemu'")

    def add_forward(self, spec: LaunchSpec, host_port: int, guest_port: int) -> None:
        """User mode: forward ``host_port`` (127.0.0.1) to ``guest_port`` on a running VM."""
        raise NetworkError(f"the {self.name} backend cannot add forwards to a running VM's user-mode network")

    def remove_forward(self, spec: LaunchSpec, host_port: int) -> None:
        """User mode: remove the forward of ``host_port`` from a running VM."""
        raise NetworkError(f"the {self.name} backend cannot remove forwards from a running VM")
