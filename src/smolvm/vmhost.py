"""Host-side helpers for the manager: accelerator choice, guest shutdown, env file text."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from smolvm.backends.base import LaunchSpec
from smolvm.exceptions import SmolVMError
from smolvm.types import validate_env_key

log = logging.getLogger("smolvm")

ENV_HEADER = "# Managed by SmolVM (set_env_vars). Sourced by login shells.\n"


def env_file_text(env: dict[str, str]) -> str:
    """``/etc/profile.d/smolvm_env.sh``: one ``export KEY='value'`` per variable.

    Values are single-quoted (shlex.quote), so quotes, newlines and ``$(...)`` stay literal."""
    lines = [ENV_HEADER]
    for k in sorted(env):
        validate_env_key(k)
        lines.append(f"export {k}={shlex.quote(str(env[k]))}\n")
    return "".join(lines)


def parse_env_file(text: str) -> dict[str, str]:
    """Inverse of :func:`env_file_text` (parsed with shlex, never executed)."""
    out: dict[str, str] = {}
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    for tok in lex:
        if tok == "export":
            continue
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


class HostManager:
    """Host capabilities used by the manager (cached probes)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.cache_dir = data_dir / "cache"

    def accel(self) -> Any:
        from smolvm.host.accel import accel_decision

        return accel_decision(self.cache_dir)

    def request_guest_shutdown(self, row: dict[str, Any], spec: LaunchSpec) -> None:
        """Ask the guest's PID 1 to power off: agent first, then the VMM's own request."""
        if spec.agent_socket.exists():
            try:
                from smolvm.backends.base import agent_sockets
                from smolvm.transports.agent import AgentTransport

                t = AgentTransport(agent_sockets(spec), connect_timeout=1.0)
                try:
                    t.shutdown()
                    return
                finally:
                    t.close()
            except (SmolVMError, OSError, ImportError, AttributeError) as exc:
                log.debug("agent shutdown of %s failed: %s", row["vm_id"], exc)
        from smolvm.backends import get_backend

        try:
            get_backend(row["backend"]).request_shutdown(spec)
        except SmolVMError as exc:
            log.debug("VMM shutdown request for %s failed: %s", row["vm_id"], exc)
