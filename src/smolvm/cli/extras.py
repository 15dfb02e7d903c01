"""audit, snapshot create|restore|list|rm, demo and version."""

from __future__ import annotations

import platform
import re
import sys
import time
from datetime import timedelta
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import CLIError, emit_json, err, fmt_age, out, usage_error

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


# ---------------------------------------------------------------------- audit
def audit_log() -> Any:
    """The AuditLog on this data dir's state database (read side: no pruning)."""
    try:
        from smolvm.guards.audit import AuditLog
    except ImportError as exc:
        raise CLIError(f"audit log support is missing from this build ({exc})") from None
    return AuditLog(common.data_dir() / "state.db", prune_every=None)


def parse_since(text: str) -> timedelta:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise usage_error(f"--since expects a duration like 90s, 15m, 2h or 7d, got {text!r}")
    n, unit = float(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def audit(
    vm_id: Annotated[str | None, typer.Argument(help="VM id (default: all VMs, also deleted ones).", metavar="[ID]")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most N records (newest first).", min=0)] = 50,
    status: Annotated[list[str] | None, typer.Option("--status", help="ok|failed|blocked|error (repeatable).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only the last 90s / 15m / 2h / 7d.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the audit trail: every command run (or blocked) in a VM."""
    log = audit_log()
    try:
        recs = log.query(vm_id, since=parse_since(since) if since else None,
                         status=status or None, limit=limit)
    finally:
        log.close()
    if json_out:
        emit_json([r.to_dict() for r in recs])
        return
    if not recs:
        err.print("no audit records" + (f" for {vm_id}" if vm_id else ""))
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("WHEN", *([] if vm_id else ["VM"]), "STATUS", "EXIT", "TIME", "COMMAND"):
        t.add_column(col, overflow="fold")
    colors = {"ok": "green", "failed": "yellow", "blocked": "red", "error": "red"}
    for r in reversed(recs):  # oldest at the top, like a log
        detail = r.blocked_by or r.error
        cmd = common.esc(r.command) + (f" [dim]({common.esc(detail)})[/]" if detail else "")
        t.add_row(r.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"), *([] if vm_id else [r.vm_id]),
                  f"[{colors.get(r.status, '')}]{r.status}[/]",
                  "-" if r.exit_code is None else str(r.exit_code),
                  "-" if r.duration is None else f"{r.duration:.2f}s", cmd)
    out.print(t)


# ---------------------------------------------------------------------- snapshots
snapshot_app = typer.Typer(name="snapshot", no_args_is_help=True,
                           help="Save a running VM's memory+disk and restore clones of it in well under a second.")


def _need(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    if fn is None:
        raise CLIError(f"snapshots are not available in this build ({type(obj).__name__}.{name} is missing)",
                       "update smolvm")
    return fn


def snap_dict(s: Any) -> dict[str, Any]:
    """A SnapshotInfo (or a plain mapping) as JSON-ready data."""
    if isinstance(s, dict):
        return dict(s)
    from datetime import datetime, timezone

    cfg = getattr(s, "config", None)
    created = getattr(s, "created_at", None)
    if isinstance(created, (int, float)):
        created = datetime.fromtimestamp(created, tz=timezone.utc).isoformat()
    return {
        "name": s.name, "kind": getattr(s, "kind", "user"), "source_vm": getattr(s, "source_vm", None),
        "parent": getattr(s, "parent", None), "created_at": created,
        "memory": getattr(s, "memory", None), "size_bytes": getattr(s, "size_bytes", None),
        "path": str(getattr(s, "path", "")),
        "mem_size_mib": getattr(cfg, "mem_size_mib", None), "vcpu_count": getattr(cfg, "vcpu_count", None),
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
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the clone (repeatable).")] = None,
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
        t.add_row(str(s.get("name")), str(s.get("source_vm") or "-"),
                  f"{s['mem_size_mib']} MiB" if s.get("mem_size_mib") else "-",
                  common.fmt_bytes(s["size_bytes"]) if s.get("size_bytes") else "-",
                  fmt_age(s.get("created_at")), str(s.get("path") or "-"))
    out.print(t)


@snapshot_app.command("rm")
def snapshot_rm(names: Annotated[list[str], typer.Argument(help="Snapshot name(s).")]) -> None:
    """Delete snapshots (refused while a VM or snapshot is built on one)."""
    with common.open_manager() as m:
        fn = _need(m, "delete_snapshot")
        for name in names:
            fn(name)
            err.print(f"deleted snapshot {name}")


# ---------------------------------------------------------------------- demo
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Keep the VM running afterwards (prints its id).")] = False,
) -> None:
    """Build the default image if needed, boot a sandbox, run two commands, clean up."""
    from smolvm.cli.images import ensure_image
    from smolvm.facade import SmolVM

    t_all = time.monotonic()
    art = ensure_image(quiet_if_ready=False)
    t0 = time.monotonic()
    vm = SmolVM(VMConfig_for(art), data_dir=common.OPTS.data_dir, backend=common.OPTS.backend)
    err.print(f"created sandbox [bold]{vm.vm_id}[/] in {(time.monotonic() - t0) * 1000:.0f} ms; booting…")
    timings: list[float] = []
    t_boot = 0.0
    try:
        t0 = time.monotonic()
        vm.start(boot_timeout=60)
        t_boot = time.monotonic() - t0
        info = vm.info
        err.print(f"booted in [bold]{t_boot:.2f} s[/] (accelerator {info.accelerator}: "
                  f"{common.esc(info.accelerator_reason or '')})")
        for cmd in ("echo 'Hello from SmolVM'", "uname -a"):
            t0 = time.monotonic()
            res = vm.run(cmd, timeout=30)
            timings.append(time.monotonic() - t0)
            out.print(f"[bold cyan]$ {common.esc(cmd)}[/]")
            sys.stdout.write(res.stdout)
            sys.stdout.flush()
            if res.stderr:
                sys.stderr.write(res.stderr)
            err.print(f"[dim]  exit {res.exit_code} in {timings[-1] * 1000:.0f} ms via {vm.channel}[/]")
            if not res.ok:
                raise CLIError(f"demo command {cmd!r} failed with exit code {res.exit_code}")
    except BaseException:
        vm.__exit__(None, None, None)  # owned VM: deleted
        raise
    if keep:
        vm.close()  # release handles only: the VM keeps running
        err.print(f"kept {vm.vm_id}: `smolvm run {vm.vm_id} -- CMD`, then `smolvm delete --force {vm.vm_id}`")
        out.print(vm.vm_id, markup=False)
        return
    t0 = time.monotonic()
    vm.__exit__(None, None, None)  # owned VM: deleted
    err.print(f"deleted in {(time.monotonic() - t0) * 1000:.0f} ms; total {time.monotonic() - t_all:.1f} s "
              f"(boot {t_boot:.2f} s, commands {', '.join(f'{x * 1000:.0f} ms' for x in timings)})")


def VMConfig_for(art: Any) -> Any:  # noqa: N802 - reads like a constructor
    from smolvm.types import VMConfig

    return VMConfig(kernel_path=art.kernel, rootfs_path=art.rootfs)


# ---------------------------------------------------------------------- version
def version_text() -> str:
    from smolvm import __version__

    return __version__


def version(json_out: JsonOpt = False) -> None:
    """Print the versions of smolvm, Python and QEMU."""
    from smolvm.backends.qemu import qemu_binary
    from smolvm.cli.doctor import _version_line

    q = qemu_binary()
    qv = _version_line([q, "--version"]) if q else None
    d = {"smolvm": version_text(), "python": platform.python_version(), "qemu": qv}
    if json_out:
        emit_json(d)
        return
    out.print(f"smolvm {d['smolvm']}\npython {d['python']}\nqemu   {qv or 'not installed'}", markup=False)
