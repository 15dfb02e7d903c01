"""``smolvm audit``: the audit log of commands run in sandboxes."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import CLIError, emit_json, err, out, usage_error

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
    vm_id: Annotated[
        str | None, typer.Argument(help="VM id (default: all VMs, also deleted ones).", metavar="[ID]")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="At most N records (newest first).", min=0)
    ] = 50,
    status: Annotated[
        list[str] | None, typer.Option("--status", help="ok|failed|blocked|error (repeatable).")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only the last 90s / 15m / 2h / 7d.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the audit trail: every command run (or blocked) in a VM."""
    log = audit_log()
    try:
        recs = log.query(
            vm_id, since=parse_since(since) if since else None, status=status or None, limit=limit
        )
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
        t.add_row(
            r.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            *([] if vm_id else [r.vm_id]),
            f"[{colors.get(r.status, '')}]{r.status}[/]",
            "-" if r.exit_code is None else str(r.exit_code),
            "-" if r.duration is None else f"{r.duration:.2f}s",
            cmd,
        )
    out.print(t)
