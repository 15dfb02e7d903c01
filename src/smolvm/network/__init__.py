"""Host networking: user-mode NAT with 127.0.0.1 forwards (rootless), TAP + nftables (root)."""

from smolvm.network.manager import NetworkManager

__all__ = ["NetworkManager"]
