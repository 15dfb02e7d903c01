"""``smolvm port expose|list|close``: guest ports on the host's 127.0.0.1."""

from __future__ import annotations

from typing import Annotated

import typer

from smolvm.cli.common import emit_json, open_manager, out

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
VmId = Annotated[str, typer.Argument(help="VM id (see `smolvm list`).", metavar="ID")]

port_app = typer.Typer(
    name="port",
    no_args_is_help=True,
    help="Expose guest TCP ports on 127.0.0.1 (never on other interfaces).",
)


@port_app.command("expose")
def expose(
    vm_id: VmId,
    guest_port: Annotated[int, typer.Argument(help="TCP port in the guest.", min=1, max=65535)],
    host_port: Annotated[
        int | None, typer.Option("--host-port", help="Port on 127.0.0.1 (default: a free one).", min=1024)
    ] = None,
) -> None:
    """Forward 127.0.0.1:HOST_PORT to the guest's port; prints the host port."""
    with open_manager() as m:
        port = m.expose_local(vm_id, guest_port, host_port)
    out.print(str(port), markup=False)


@port_app.command("list")
def list_ports(vm_id: VmId, json_out: JsonOpt = False) -> None:
    """The VM's exposed ports (host → guest)."""
    with open_manager() as m:
        ports = m.exposed_ports(vm_id)
    if json_out:
        emit_json([{"host_port": h, "guest_port": g} for h, g in sorted(ports.items())])
        return
    for h, g in sorted(ports.items()):
        out.print(f"127.0.0.1:{h} -> {g}", markup=False)


@port_app.command("close")
def close(
    vm_id: VmId,
    host_port: Annotated[int, typer.Argument(help="The host port `expose` printed.")],
) -> None:
    """Remove a forward made by `smolvm port expose`."""
    with open_manager() as m:
        m.unexpose_local(vm_id, host_port)
