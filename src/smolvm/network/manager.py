"""Network allocation for VMs. User-mode networking needs no privileges: the guest sits
behind QEMU's NAT at a fixed address and reaches the host only through forwards we bind
on 127.0.0.1 (never on all interfaces)."""

from __future__ import annotations

from smolvm.exceptions import ValidationError
from smolvm.network.ports import mac_for, reserve_ports
from smolvm.network.tap import allocate_tap, guest_dns, prefix_of, release_tap
from smolvm.state import StateStore
from smolvm.types import InternetSettings, NetworkInfo

USER_GUEST_IP = "10.0.2.15"
USER_GATEWAY = "10.0.2.2"
USER_DNS = "10.0.2.3"
USER_PREFIX = 24


class NetworkManager:
    """Allocates addresses and forwarded ports; every reservation goes to the state store first."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def allocate(
        self, vm_id: str, mode: str, forwards: dict[int, int], settings: InternetSettings | None = None
    ) -> NetworkInfo:
        if mode == "none":
            return NetworkInfo(mode="none")
        if mode == "tap":
            if settings is not None and settings.domains:
                raise ValidationError(
                    "allowed_domains with names works with network='user' (its namespace runs the "
                    "name-checking proxy); with network='tap' use ['*'], [] and allowed_cidrs",
                    field="internet_settings",
                )
            return allocate_tap(self.state, vm_id, forwards, settings)
        ssh_port = reserve_ports(self.state, vm_id, forwards)
        return NetworkInfo(
            mode="user",
            guest_ip=USER_GUEST_IP,
            gateway_ip=USER_GATEWAY,
            netmask="255.255.255.0",
            mac_address=mac_for(vm_id),
            ssh_host_port=ssh_port,
            port_forwards=dict(forwards),
        )

    @staticmethod
    def kernel_arg(net: NetworkInfo, settings: InternetSettings | None = None) -> str | None:
        if net.mode == "none" or not net.guest_ip:
            return None
        if net.mode == "tap":
            v4 = [d for d in (settings.dns_servers if settings else []) if "." in d]
            tap_dns = v4[0] if v4 else guest_dns(net.gateway_ip)
            return f"smolvm.net={net.guest_ip}/{prefix_of(net.netmask)},{net.gateway_ip},{tap_dns}"
        return f"smolvm.net={net.guest_ip}/{USER_PREFIX},{net.gateway_ip},{USER_DNS}"

    def release(self, vm_id: str, net: NetworkInfo) -> None:
        if net.mode == "tap":
            release_tap(self.state, vm_id, net)
        self.state.release_ports(vm_id)
