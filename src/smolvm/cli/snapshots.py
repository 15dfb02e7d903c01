"""``smolvm snapshot create|restore|list|rm``."""

from __future__ import annotations

import time
from datetime import UTC
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import CLIError, emit_json, err, fmt_age, out

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


# ---------------------------------------------------------------------- snapshots
snapshot_app = typer.Typer(
    name="snapshot",
    no_args_is_help=True,
    help="Save a running VM's memory+disk and restore clones of it in well under a second.",
)


def _need(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    if fn is None:
        raise CLIError(
            f"snapshots are not available in this build ({type(obj).__name__}.{name} is missing)",
            "update smolvm",
        )
    return fn


def snap_dict(s: Any) -> dict[str, Any]:
    """A SnapshotInfo (or a plain mapping) as JSON-ready data."""
    if isinstance(s, dict):
        return dict(s)
    from datetime import datetime

    cfg = getattr(s, "config", None)
    created = getattr(s, "created_at", None)
    if isinstance(created, (int, float)):
        created = datetime.fromtimestamp(created, tz=UTC).isoformat()
    return {
        "name": s.name,
        "kind": getattr(s, "kind", "user"),
        "source_vm": getattr(s, "source_vm", None),
        "parent": getattr(s, "parent", None),
        "created_at": created,
        "memory": getattr(s, "memory", None),
        "size_bytes": getattr(s, "size_bytes", None),
        "path": str(getattr(s, "path", "")),
        "mem_size_mib": getattr(cfg, "mem_size_mib", None),
        "vcpu_count": getattr(cfg, "vcpu_count", None),
    }


@snapshot_app.command("create")
def snapshot_create(
    vm_id: Annotated[str, typer.Argument(help="Running VM to snapshot.", metavar="ID")],
    name: Annotated[str, typer.Argument(help="Snapshot name.")],
    paused: Annotated[bool, typer.Option("--leave-paused", help="Leave the VM paused afterwards.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Snapshot a running VM's memory, devices and disk as NAME (it pauses ~0.1-0.3 s)."""
    with common.open_manager() as m:
        common.require_running(m.get(vm_id))
        t0 = time.monotonic()
        snap = _need(m, "snapshot")(vm_id, name, resume=not paused)
        dt = time.monotonic() - t0
    d = snap_dict(snap)
    if json_out:
        emit_json({**d, "seconds": round(dt, 3)})
        return
    size = f", {common.fmt_bytes(d['size_bytes'])}" if d.get("size_bytes") else ""
    err.print(f"saved snapshot {name} of {vm_id} in {dt:.2f} s{size}")
    out.print(name, markup=False)


@snapshot_app.command("restore")
def snapshot_restore(
    name: Annotated[str, typer.Argument(help="Snapshot name.")],
    vm_id: Annotated[str | None, typer.Option("--id", help="Id of the new VM (default: random).")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the clone (repeatable).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait until it is ready.")] = 60.0,
) -> None:
    """Start a new VM (a clone) from snapshot NAME and print its id. It keeps running."""
    overrides: dict[str, Any] = {}
    if env:
        overrides["env_vars"] = common.parse_env_pairs(env)
    with common.open_manager() as m:
        t0 = time.monotonic()
        info = _need(m, "restore_snapshot")(name, vm_id=vm_id, boot_timeout=timeout, **overrides)
    err.print(f"restored {name} as {info.vm_id} in {time.monotonic() - t0:.2f} s")
    out.print(info.vm_id, markup=False)


@snapshot_app.command("list")
def snapshot_list(json_out: JsonOpt = False) -> None:
    """List snapshots."""
    with common.open_manager() as m:
        snaps = [snap_dict(s) for s in _need(m, "list_snapshots")()]
    if json_out:
        emit_json(snaps)
        return
    if not snaps:
        err.print("no snapshots: create one with `smolvm snapshot create ID NAME`")
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "SOURCE VM", "MEM", "SIZE", "CREATED", "PATH"):
        t.add_column(col)
    for s in snaps:
        t.add_row(
            str(s.get("name")),
            str(s.get("source_vm") or "-"),
            f"{s['mem_size_mib']} MiB" if s.get("mem_size_mib") else "-",
            common.fmt_bytes(s["size_bytes"]) if s.get("size_bytes") else "-",
            fmt_age(s.get("created_at")),
            str(s.get("path") or "-"),
        )
    out.print(t)


@snapshot_app.command("rm")
def snapshot_rm(names: Annotated[list[str], typer.Argument(help="Snapshot name(s).")]) -> None:
    """Delete snapshots (refused while a VM or snapshot is built on one)."""
    with common.open_manager() as m:
        fn = _need(m, "delete_snapshot")
        for name in names:
            fn(name)
            err.print(f"deleted snapshot {name}")
