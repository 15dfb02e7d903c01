"""Network allocation for VMs. User-mode networking needs no privileges: the guest sits
behind QEMU's NAT at a fixed address and reaches the host only through forwards we bind
on 127.0.0.1 (never on all interfaces)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

from smolvm.exceptions import NetworkError
from smolvm.state import StateStore
from smolvm.types import NetworkInfo

USER_GUEST_IP = "10.0.2.15"
USER_GATEWAY = "10.0.2.2"
USER_DNS = "10.0.2.3"
USER_PREFIX = 24
LOOPBACK = "127.0.0.1"


def _free_ports() -> Iterator[int]:
    """Ports the kernel says are free on 127.0.0.1 right now (the state store arbitrates)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            yield s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def mac_for(vm_id: str) -> str:
    """A stable, locally administered MAC derived from the VM id."""
    h = hashlib.sha256(vm_id.encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (h[0], h[1], h[2])


class NetworkManager:
    """Allocates addresses and forwarded ports; every reservation goes to the state store first."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def allocate(self, vm_id: str, mode: str, forwards: dict[int, int]) -> NetworkInfo:
        if mode == "none":
            return NetworkInfo(mode="none")
        if mode == "tap":
            from smolvm.network.tap import allocate_tap

            return allocate_tap(self.state, vm_id, forwards)
        ssh_port = self.state.reserve_port(vm_id, "ssh", _free_ports())
        for host_port in forwards:
            if not port_is_free(host_port):
                raise NetworkError(
                    f"host port {host_port} on {LOOPBACK} is in use; pick another port_forwards key",
                    {"port": host_port},
                )
            self.state.reserve_port(vm_id, f"forward:{forwards[host_port]}", iter([host_port]))
        return NetworkInfo(
            mode="user", guest_ip=USER_GUEST_IP, gateway_ip=USER_GATEWAY, netmask="255.255.255.0",
            mac_address=mac_for(vm_id), ssh_host_port=ssh_port, port_forwards=dict(forwards),
        )

    @staticmethod
    def kernel_arg(net: NetworkInfo) -> str | None:
        if net.mode == "none" or not net.guest_ip:
            return None
        if net.mode == "tap":
            from smolvm.network.tap import guest_dns, prefix_of

            return (f"smolvm.net={net.guest_ip}/{prefix_of(net.netmask)},{net.gateway_ip},"
                    f"{guest_dns(net.gateway_ip)}")
        dns = USER_DNS if net.mode == "user" else net.gateway_ip
        return f"smolvm.net={net.guest_ip}/{USER_PREFIX},{net.gateway_ip},{dns}"

    def release(self, vm_id: str, net: NetworkInfo) -> None:
        if net.mode == "tap":
            from smolvm.network.tap import release_tap

            release_tap(self.state, vm_id, net)
        self.state.release_ports(vm_id)
