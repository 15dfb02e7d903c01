"""TAP-mode port forwards: ``127.0.0.1:H`` → guest ``G`` by a ``socat`` process per forward.

A DNAT of 127.0.0.1 into a TAP needs ``route_localnet`` on the TAP (loopback addresses
routed off the host), which lets the guest address the host's loopback. A userspace relay
on 127.0.0.1 needs nothing of the kind: the guest only ever sees connections from its
gateway. ``socat`` (Debian) is the relay; each one is a ``helper`` resource of its VM,
recorded as soon as it exists, killed with the VM.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from smolvm.exceptions import NetworkError
from smolvm.network.ports import wait_listening

LISTEN_TIMEOUT = 5.0


def socat() -> str:
    path = shutil.which("socat") or ("/usr/bin/socat" if Path("/usr/bin/socat").exists() else None)
    if path is None:
        raise NetworkError("socat not found: TAP-mode port forwards need it (apt-get install socat)")
    return path


def argv(host_port: int, guest_ip: str, guest_port: int) -> list[str]:
    return [
        socat(),
        f"TCP-LISTEN:{int(host_port)},bind=127.0.0.1,reuseaddr,fork,max-children=128",
        f"TCP:{guest_ip}:{int(guest_port)},connect-timeout=10",
    ]


def start(host_port: int, guest_ip: str, guest_port: int, record_helper: Callable[[int], None]) -> int:
    """Start the relay, record it, wait until it listens; returns its pid."""
    proc = subprocess.Popen(
        argv(host_port, guest_ip, guest_port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    record_helper(proc.pid)
    if not wait_listening(proc, [("tcp", host_port)], LISTEN_TIMEOUT):
        proc.kill()
        raise NetworkError(
            f"the port forward 127.0.0.1:{host_port} -> {guest_ip}:{guest_port} did not start "
            "(is the host port taken?)"
        )
    return proc.pid


def serves(pid: int, host_port: int) -> bool:
    """Process ``pid`` is the relay of ``host_port``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.startswith(f"TCP-LISTEN:{int(host_port)},".encode()) for a in args)
