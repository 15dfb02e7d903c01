"""``smolvm fleet status``: the nodes of a Ray cluster that run SmolVM sandboxes."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from smolvm.cli.common import CLIError, emit_json, out

fleet_app = typer.Typer(name="fleet", no_args_is_help=True, help="SmolVM sandboxes across a Ray cluster.")


@fleet_app.command("status")
def status(
    address: Annotated[
        str, typer.Option("--address", help="The Ray cluster (host:port, or auto = RAY_ADDRESS / local).")
    ] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Per node: sandbox capacity, running sandboxes and warm-pool VMs (read-only)."""
    try:
        import ray  # optional extra, and heavy: only this command needs it
    except ImportError:
        raise CLIError("Ray is not installed", "pip install 'smolvm[ray]'") from None
    from smolvm.fleet.actors import HOST_PREFIX, NAMESPACE  # imports ray: after the check

    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise CLIError(
            f"cannot join the Ray cluster at {address}: {exc}", "start one: ray start --head"
        ) from None
    try:
        rows: list[dict[str, Any]] = []
        for n in ray.nodes():
            cap = n.get("Resources", {}).get("smolvm", 0)
            if not n.get("Alive") or cap <= 0:
                continue
            row: dict[str, Any] = {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "capacity": cap,
            }
            try:
                host = ray.get_actor(HOST_PREFIX + n["NodeID"])
                info: Any = ray.get(host.info.remote(), timeout=30)
                row.update(running=info["running"], pool_ready=info["pool_ready"], data_dir=info["data_dir"])
            except ValueError:  # no fleet attached to this node right now
                row.update(running=None, pool_ready=None, data_dir=None)
            rows.append(row)
    finally:
        ray.shutdown()
    if json_out:
        emit_json(rows)
        return
    if not rows:
        out.print('no node advertises the "smolvm" resource (ray start --resources=\'{"smolvm": 8}\')')
    for r in rows:
        running = "-" if r["running"] is None else r["running"]
        out.print(
            f"{r['node_id'][:12]}  {r['address']}  capacity {r['capacity']:g}  running {running}  "
            f"pool {r['pool_ready'] if r['pool_ready'] is not None else '-'}",
            markup=False,
        )
