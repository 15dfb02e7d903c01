"""Guest ports exposed on the host's 127.0.0.1, on demand (``expose_local``).

A forward is a reserved port row first (the ledger), then the VM's ``port_forwards``, so
a restart re-creates it and delete/``reconcile()`` remove it; on a running VM it is also
added live (QEMU ``hostfwd`` + the sandbox uplink in user mode, a socat relay in TAP mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smolvm.exceptions import NetworkError, StateError, ValidationError
from smolvm.network import tap
from smolvm.network.ports import LOOPBACK, free_ports, port_is_free
from smolvm.types import VMState

if TYPE_CHECKING:
    from smolvm.runtime.machines import Runtime

LIVE = (VMState.RUNNING, VMState.PAUSED)


def _check_port(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValidationError(f"{name} must be an integer {low}-65535, got {value!r}", field=name)
    return value


def expose(rt: Runtime, vm_id: str, guest_port: int, host_port: int | None = None) -> int:
    """Forward ``127.0.0.1:host_port`` (a free port when None) to the guest's TCP
    ``guest_port``; returns the host port."""
    guest_port = _check_port(guest_port, "guest_port", 1)
    if host_port is not None:
        host_port = _check_port(host_port, "host_port", 1024)
    rec = rt.state.get_vm(vm_id)
    net = rec.network
    if net.mode == "none":
        raise NetworkError(f"VM {vm_id} has no network (network='none'): nothing to expose")
    if host_port is not None:
        if host_port in net.port_forwards or host_port == net.ssh_host_port:
            raise ValidationError(
                f"host port {host_port} already forwards into VM {vm_id}", field="host_port"
            )
        if not port_is_free(host_port):
            raise NetworkError(f"host port {host_port} on {LOOPBACK} is in use; pick another or pass None")
    try:
        port = rt.state.reserve_port(
            vm_id, f"forward:{guest_port}", iter([host_port]) if host_port is not None else free_ports()
        )
    except StateError:
        raise NetworkError(
            f"host port {host_port} is reserved by another VM; pick another or pass None"
        ) from None
    try:
        if rec.status in LIVE:
            if net.mode == "tap":
                tap.add_forward(rt.state, vm_id, net, port, guest_port)
            else:
                rt.backend_for(rec.backend).add_forward(rt.spec(rec), port, guest_port)
        fwd = {**net.port_forwards, port: guest_port}
        rt.state.update_vm(vm_id, network=net.model_copy(update={"port_forwards": fwd}))
    except BaseException:
        rt.state.release_port(vm_id, port)
        raise
    return port


def unexpose(rt: Runtime, vm_id: str, host_port: int) -> None:
    """Remove the forward of ``host_port`` (see :func:`expose`)."""
    rec = rt.state.get_vm(vm_id)
    net = rec.network
    if host_port not in net.port_forwards:
        have = ", ".join(map(str, sorted(net.port_forwards))) or "none"
        raise ValidationError(
            f"host port {host_port!r} is not exposed by VM {vm_id} (exposed: {have})", field="host_port"
        )
    if rec.status in LIVE:
        if net.mode == "tap":
            tap.remove_forward(rt.state, vm_id, host_port)
        else:
            rt.backend_for(rec.backend).remove_forward(rt.spec(rec), host_port)
    fwd = {h: g for h, g in net.port_forwards.items() if h != host_port}
    rt.state.update_vm(vm_id, network=net.model_copy(update={"port_forwards": fwd}))
    rt.state.release_port(vm_id, host_port)


def exposed(rt: Runtime, vm_id: str) -> dict[int, int]:
    """``{host_port: guest_port}`` of the VM's forwards (SSH's own port not included)."""
    return dict(rt.state.get_vm(vm_id).network.port_forwards)
