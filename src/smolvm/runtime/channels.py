"""Command channels to a running VM: the guest agent or SSH."""

from __future__ import annotations

import shlex
from pathlib import Path

from smolvm.backends.base import Backend, LaunchSpec, agent_sockets
from smolvm.exceptions import CommandExecutionUnavailableError, ValidationError
from smolvm.keys import ensure_client_key, host_key_alias
from smolvm.state.records import VMRecord
from smolvm.transports.agent import AgentTransport
from smolvm.transports.base import Transport

CHANNELS = ("agent", "ssh")


def agent_transport(
    spec: LaunchSpec, backend: Backend, *, connect_timeout: float | None = None
) -> AgentTransport:
    """A connection to the guest agent (takes the first free agent port)."""
    if connect_timeout is None:
        return AgentTransport(agent_sockets(spec), vsock_port=backend.agent_vsock_port)
    return AgentTransport(
        agent_sockets(spec), vsock_port=backend.agent_vsock_port, connect_timeout=connect_timeout
    )


def ssh_endpoint(rec: VMRecord) -> tuple[str, int]:
    """``(host, port)`` where the guest's SSH server is reachable from this host."""
    net = rec.network
    if net.mode == "user" and net.ssh_host_port:
        return "127.0.0.1", net.ssh_host_port
    if net.mode == "tap" and net.guest_ip:
        return net.guest_ip, 22
    raise CommandExecutionUnavailableError(
        f"VM {rec.vm_id} has no network, so no SSH", "use comm_channel='agent' or network='user'", rec.vm_id
    )


def open_transport(
    rec: VMRecord, spec: LaunchSpec, backend: Backend, channel: str, keys_dir: Path
) -> Transport:
    """A new command channel to a running VM: ``channel`` is "agent" or "ssh"."""
    if channel == "agent":
        return agent_transport(spec, backend)
    if channel != "ssh":
        raise ValidationError(
            f"comm_channel must be auto, agent or ssh, got {channel!r}", field="comm_channel"
        )
    host, port = ssh_endpoint(rec)
    if not rec.host_key:
        raise CommandExecutionUnavailableError(
            f"VM {rec.vm_id} has no recorded SSH host key", "recreate the VM", rec.vm_id
        )
    key, _ = ensure_client_key(keys_dir)
    # paramiko costs ~45 ms of `import smolvm`; agent-channel users never load it.
    from smolvm.transports.ssh import SSHTransport

    return SSHTransport(
        host,
        port,
        key_path=key,
        host_key_alias=host_key_alias(rec.vm_id),
        host_public_key=rec.host_key,
        vm_id=rec.vm_id,
    )


def ssh_commands(
    rec: VMRecord, *, key: Path, known_hosts: Path, ssh_user: str = "root", public_host: str | None = None
) -> dict[str, str]:
    """Ready-to-run ``ssh`` commands with the VM's host key pinned."""
    opts = [
        "-i",
        str(key),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"HostKeyAlias={host_key_alias(rec.vm_id)}",
        "-o",
        "IdentitiesOnly=yes",
    ]
    q = shlex.join
    out = {}
    net = rec.network
    if net.guest_ip:
        out["private_ip"] = q(["ssh", *opts, f"{ssh_user}@{net.guest_ip}"])
    if net.ssh_host_port:
        out["localhost_port"] = q(["ssh", *opts, "-p", str(net.ssh_host_port), f"{ssh_user}@127.0.0.1"])
        if public_host:
            out["public"] = q(["ssh", *opts, "-p", str(net.ssh_host_port), f"{ssh_user}@{public_host}"])
    return out


def with_scp(ssh: str) -> dict[str, str]:
    """``ssh`` (a ready ``ssh ... user@host`` command) plus matching ``scp`` templates."""
    argv = shlex.split(ssh)
    target, opts = argv[-1], argv[1:-1]
    scp = shlex.join(["scp", *("-P" if o == "-p" else o for o in opts)])
    return {
        "ssh": ssh,
        "scp_to_guest": f"{scp} <local> {target}:<remote>",
        "scp_from_guest": f"{scp} {target}:<remote> <local>",
    }
