"""Host ports and MACs for VMs: free ports on 127.0.0.1, reserved in the state store first."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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


def wait_listening(proc: subprocess.Popen[bytes], ports: list[tuple[str, int]], timeout: float) -> bool:
    """Until ``proc`` has a socket on 127.0.0.1 for every ``(proto, port)`` (a TCP one in
    LISTEN state), as its /proc/PID/net shows them: that is the process's own network
    namespace, so nothing needs to enter it to look. False if it exits or time runs out."""
    want = {(proto, f"0100007F:{port:04X}") for proto, port in ports}
    deadline = time.monotonic() + timeout
    while True:
        seen = set()
        for proto in {p for p, _ in want}:
            try:
                rows = Path(f"/proc/{proc.pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                rows = []
            seen |= {
                (proto, f[1]) for f in map(str.split, rows) if len(f) > 3 and (proto != "tcp" or f[3] == "0A")
            }
        if want <= seen:
            return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
