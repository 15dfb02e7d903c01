"""The network endpoints of a sandbox: ports on 127.0.0.1 and ready-made SSH commands (a
part of ``SmolVM``, kept apart to keep modules small)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from smolvm.exceptions import CommandExecutionUnavailableError
from smolvm.runtime.channels import with_scp
from smolvm.types import VMInfo

if TYPE_CHECKING:
    from smolvm.vm import SmolVMManager


class Endpoints:
    """Mixin of :class:`smolvm.SmolVM`: needs ``_manager``, ``_info``, ``vm_id``, ``refresh``."""

    _manager: SmolVMManager
    _info: VMInfo

    @property
    def vm_id(self) -> str:
        raise NotImplementedError

    def refresh(self) -> VMInfo:
        raise NotImplementedError

    def wait_for_ssh(self, timeout: float = 60.0) -> None:
        """Block until SSH answers (``timeout`` seconds) — for custom boot sequences."""
        self._manager.transport(self.vm_id, "ssh").wait_ready(timeout)

    # ------------------------------------------------------------------ commands

    def expose_local(self, guest_port: int, host_port: int | None = None) -> int:
        """Serve the guest's TCP ``guest_port`` on the host's ``127.0.0.1:host_port`` (a
        free port when None); returns the host port. Kept across stop/start, removed by
        :meth:`unexpose_local` and delete. Never bound on other interfaces."""
        port = self._manager.expose_local(self.vm_id, guest_port, host_port)
        self.refresh()
        return port

    def unexpose_local(self, host_port: int) -> None:
        """Remove the forward of ``host_port`` made by :meth:`expose_local`."""
        self._manager.unexpose_local(self.vm_id, host_port)
        self.refresh()

    def exposed_ports(self) -> dict[int, int]:
        """``{host_port: guest_port}`` of the VM's forwards on 127.0.0.1 (SSH excluded)."""
        return self._manager.exposed_ports(self.vm_id)

    def ssh_commands(
        self, ssh_user: str = "root", key_path: str | Path | None = None, public_host: str | None = None
    ) -> dict[str, str]:
        """Shell-ready "ssh", "scp_to_guest" and "scp_from_guest" commands (host key pinned)."""
        cmds = self._manager.get_ssh_commands(
            self.vm_id, ssh_user=ssh_user, key_path=key_path, public_host=public_host
        )
        ssh = cmds.get("localhost_port") or cmds.get("private_ip")
        if ssh is None:
            raise CommandExecutionUnavailableError(
                f"VM {self.vm_id} has no SSH endpoint (network={self._info.config.network})",
                "create it with network='user' or 'tap'",
                self.vm_id,
            )
        return {**cmds, **with_scp(ssh)}
