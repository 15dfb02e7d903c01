"""Host ports and MACs for VMs: free ports on 127.0.0.1, reserved in the state store first."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

from smolvm.exceptions import NetworkError
from smolvm.state import StateStore

LOOPBACK = "127.0.0.1"


def free_ports() -> Iterator[int]:
    """Ports the kernel says are free on 127.0.0.1 right now (the state store arbitrates)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            yield s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on ``127.0.0.1:port`` (connections in TIME_WAIT do not count: the
    forwarders bind with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def mac_for(vm_id: str) -> str:
    """A stable, locally administered MAC derived from the VM id."""
    h = hashlib.sha256(vm_id.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def reserve_ports(state: StateStore, vm_id: str, forwards: dict[int, int]) -> int:
    """Reserve the VM's SSH port and its ``forwards`` (host port -> guest port) on 127.0.0.1;
    returns the SSH port."""
    ssh_port = state.reserve_port(vm_id, "ssh", free_ports())
    for host_port, guest_port in forwards.items():
        if not port_is_free(host_port):
            raise NetworkError(
                f"host port {host_port} on {LOOPBACK} is in use; pick another port_forwards key",
                {"port": host_port},
            )
        state.reserve_port(vm_id, f"forward:{guest_port}", iter([host_port]))
    return ssh_port
