"""AuditLog: record every command (run, failed, errored or blocked) in SQLite.

Rows live in the ``audit_log`` table of the SmolVM state database (``<data dir>/state.db``)
by default, next to the VM records, so ``smolvm audit VM_ID`` can show them. Any other path
works too. The database is shared safely by threads and processes: WAL journal, one
connection per thread and process, short ``BEGIN IMMEDIATE`` write transactions and a
30 s busy timeout. The file is created with mode 0600.

Hooks:

- ``on_pre_run`` remembers the start time (``ctx.started_at`` is used when the facade sets
  it). It never touches the database and never vetoes.
- ``on_post_run`` → status ``ok`` (exit code 0) or ``failed``.
- ``on_run_error`` → status ``error`` with the transport error text.
- ``on_blocked(ctx, error)`` → status ``blocked`` with the vetoing guard and its reason.
  Callbacks get no post hook for a vetoed command, so the facade calls this optional hook
  (``smolvm.callbacks``) on every callback that defines it.

Database errors in hooks are logged and counted (``write_errors``), never raised: an audit
problem must not break a command that already ran.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from smolvm.callbacks import Callback, EnvContext, FileContext, LifecycleContext, RunContext
from smolvm.exceptions import CommandBlockedError, SmolVMError, ValidationError
from smolvm.paths import resolve_data_dir
from smolvm.state import StateStore

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "blocked", "error")

_COLUMNS = (
    "vm_id",
    "command",
    "shell",
    "timeout",
    "started_at",
    "ended_at",
    "duration",
    "exit_code",
    "stdout_bytes",
    "stderr_bytes",
    "status",
    "blocked_by",
    "error",
    "channel",
)


def default_db_path() -> Path:
    """``state.db`` in the SmolVM data dir ($SMOLVM_DATA_DIR, ~/.local/state/smolvm, /var/lib/smolvm)."""
    return resolve_data_dir() / "state.db"


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


@dataclass(frozen=True)
class AuditRecord:
    """One audited command. Times are timezone-aware UTC datetimes; durations in seconds.

    ``status`` is ``ok`` (exit 0), ``failed`` (non-zero exit), ``blocked`` (vetoed by a
    pre-run callback; ``blocked_by`` = ``"<GuardClass>: <reason>"``) or ``error`` (the
    transport or a pre-run hook raised; ``error`` holds the text). ``stdout``/``stderr`` are
    set only when the log was written with ``capture_output=True``.
    """

    id: int
    vm_id: str
    command: str
    shell: str | None
    timeout: float | None
    started_at: datetime
    ended_at: datetime | None
    duration: float | None
    exit_code: int | None
    stdout_bytes: int | None
    stderr_bytes: int | None
    status: str
    blocked_by: str | None = None
    error: str | None = None
    channel: str | None = None
    stdout: str | None = None
    stderr: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["started_at"] = self.started_at.isoformat()
        d["ended_at"] = self.ended_at.isoformat() if self.ended_at else None
        return d


class AuditStore:
    """The ``audit_log`` table in one SQLite file; safe across threads and processes."""

    def __init__(self, db_path: Path | str) -> None:
        self.path = Path(db_path).expanduser()
        # The state store owns the file: its mode, schema (migrations) and connections.
        self._store = StateStore(self.path)

    def connect(self) -> sqlite3.Connection:
        return self._store.connect()

    def tx(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction taking the lock up front (``BEGIN IMMEDIATE``)."""
        return self._store.tx()

    def insert(
        self,
        row: dict[str, Any],
        stdout: str | None = None,
        stderr: str | None = None,
        truncated: bool = False,
    ) -> int:
        values = [row.get(c) for c in _COLUMNS]
        with self.tx() as conn:
            cur = conn.execute(
                f"INSERT INTO audit_log ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})",
                values,
            )
            rid = int(cur.lastrowid or 0)
            if stdout is not None or stderr is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO audit_output (audit_id, stdout, stderr, truncated) "
                    "VALUES (?,?,?,?)",
                    (rid, stdout, stderr, int(truncated)),
                )
        return rid

    def query(
        self,
        vm_id: str | None = None,
        since: float | None = None,
        statuses: tuple[str, ...] | None = None,
        limit: int | None = 100,
        oldest_first: bool = False,
    ) -> list[AuditRecord]:
        where: list[str] = []
        args: list[object] = []
        if vm_id is not None:
            where.append("a.vm_id = ?")
            args.append(vm_id)
        if since is not None:
            where.append("a.started_at >= ?")
            args.append(since)
        if statuses:
            where.append(f"a.status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        sql = (
            "SELECT a.*, o.stdout AS out_text, o.stderr AS err_text FROM audit_log a "
            "LEFT JOIN audit_output o ON o.audit_id = a.id"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY a.started_at DESC, a.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = self.connect().execute(sql, args).fetchall()
        recs = [
            AuditRecord(
                id=r["id"],
                vm_id=r["vm_id"],
                command=r["command"],
                shell=r["shell"],
                timeout=r["timeout"],
                started_at=datetime.fromtimestamp(r["started_at"], tz=UTC),
                ended_at=_ts(r["ended_at"]),
                duration=r["duration"],
                exit_code=r["exit_code"],
                stdout_bytes=r["stdout_bytes"],
                stderr_bytes=r["stderr_bytes"],
                status=r["status"],
                blocked_by=r["blocked_by"],
                error=r["error"],
                channel=r["channel"],
                stdout=r["out_text"],
                stderr=r["err_text"],
            )
            for r in rows
        ]
        if oldest_first:
            recs.reverse()
        return recs

    def count(self) -> int:
        return int(self.connect().execute("SELECT COUNT(*) FROM audit_log").fetchone()[0])

    def prune(self, retention_days: float | None, max_rows: int | None, now: float | None = None) -> int:
        """Delete rows older than ``retention_days`` and all but the newest ``max_rows``."""
        deleted = 0
        with self.tx() as conn:
            if retention_days is not None:
                cutoff = (time.time() if now is None else now) - retention_days * 86400.0
                deleted += conn.execute("DELETE FROM audit_log WHERE started_at < ?", (cutoff,)).rowcount
            if max_rows is not None:
                row = conn.execute(
                    "SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)
                ).fetchone()
                if row is not None:
                    deleted += conn.execute("DELETE FROM audit_log WHERE id <= ?", (row[0],)).rowcount
            if deleted:
                conn.execute("DELETE FROM audit_output WHERE audit_id NOT IN (SELECT id FROM audit_log)")
        return deleted

    def close(self) -> None:
        self._store.close()


@dataclass
class _Pending:
    vm_id: str
    command: str
    wall: float
    mono: float


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _nbytes(raw: bytes | None, text: str | None) -> int | None:
    if raw is not None:
        return len(raw)
    if text is not None:
        return len(text.encode("utf-8", "surrogatepass"))
    return None


class AuditLog(Callback):
    """Record every command a VM runs, including blocked ones, in SQLite.

    Args:
        db_path: SQLite file; default ``<SmolVM data dir>/state.db``.
        retention_days: rows older than this are deleted by :meth:`prune` (None: keep).
        max_rows: keep at most this many rows, newest first (None: no cap).
        capture_output: also store stdout/stderr text (each cut to ``max_output_bytes``).
        max_output_bytes: cap per stream when capturing output.
        prune_every: run :meth:`prune` automatically after this many writes by this
            instance (and once at start); None disables automatic pruning.

    One instance may be shared by many VMs and threads; per-command state is keyed by the
    identity of the ``RunContext``.
    """

    MAX_PENDING = 10_000

    def __init__(
        self,
        db_path: Path | str | None = None,
        *,
        retention_days: float | None = 30,
        max_rows: int | None = 100_000,
        capture_output: bool = False,
        max_output_bytes: int = 64 * 1024,
        prune_every: int | None = 1000,
    ) -> None:
        if retention_days is not None and (
            isinstance(retention_days, bool)
            or not isinstance(retention_days, (int, float))
            or not retention_days > 0
        ):
            raise ValidationError(
                f"retention_days must be a positive number or None, got {retention_days!r}",
                field="retention_days",
            )
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise ValidationError(
                f"max_rows must be a positive integer or None, got {max_rows!r}", field="max_rows"
            )
        if not isinstance(max_output_bytes, int) or max_output_bytes < 0:
            raise ValidationError("max_output_bytes must be an integer >= 0", field="max_output_bytes")
        if prune_every is not None and (not isinstance(prune_every, int) or prune_every < 1):
            raise ValidationError("prune_every must be a positive integer or None", field="prune_every")
        self.db_path = Path(db_path).expanduser() if db_path is not None else default_db_path()
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.capture_output = capture_output
        self.max_output_bytes = max_output_bytes
        self.prune_every = prune_every
        self.store = AuditStore(self.db_path)
        self.write_errors = 0
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._lock = threading.Lock()
        self._writes = 0
        if prune_every is not None:
            self._safe(self.prune)

    # ------------------------------------------------------------------ hooks

    def on_pre_run(self, ctx: RunContext) -> None:
        started = _epoch(getattr(ctx, "started_at", None))
        p = _Pending(
            ctx.vm_id, ctx.command, started if started is not None else time.time(), time.monotonic()
        )
        with self._lock:
            self._pending[id(ctx)] = p
            self._pending.move_to_end(id(ctx))
            while len(self._pending) > self.MAX_PENDING:  # facade never finished these
                self._pending.popitem(last=False)

    def on_post_run(self, ctx: RunContext) -> None:
        res = ctx.result
        row = self._base_row(ctx, result_duration=getattr(res, "duration", None))
        stdout = stderr = None
        truncated = False
        if res is not None:
            row["exit_code"] = res.exit_code
            row["status"] = "ok" if res.exit_code == 0 else "failed"
            row["stdout_bytes"] = _nbytes(getattr(res, "stdout_bytes", None), res.stdout)
            row["stderr_bytes"] = _nbytes(getattr(res, "stderr_bytes", None), res.stderr)
            if self.capture_output:
                stdout, t1 = self._cut(res.stdout)
                stderr, t2 = self._cut(res.stderr)
                truncated = t1 or t2
        else:
            row["status"] = "error"
            row["error"] = "on_post_run called without a result"
        self._write(row, stdout, stderr, truncated)

    def on_run_error(self, ctx: RunContext) -> None:
        row = self._base_row(ctx)
        row["status"] = "error"
        err = ctx.error
        row["error"] = f"{type(err).__name__}: {err}" if err is not None else "unknown error"
        self._write(row)

    def on_blocked(self, ctx: RunContext, error: BaseException) -> None:
        """Record a command vetoed by a pre-run callback (called by the facade)."""
        row = self._base_row(ctx)
        if isinstance(error, CommandBlockedError):
            details = getattr(error, "details", {}) or {}
            guard = details.get("guard") or type(error).__name__
            reason = getattr(error, "message", None) or str(error)
            row["status"] = "blocked"
            row["blocked_by"] = f"{guard}: {reason}"
        else:  # a pre-run hook crashed: the command did not run either
            row["status"] = "error"
            row["error"] = f"pre-run hook raised {type(error).__name__}: {error}"
        self._write(row)

    #: Alias for callers that record a veto themselves.
    record_blocked = on_blocked

    # ------------------------------------------------------------------ queries

    def query(
        self,
        vm_id: str | None = None,
        since: datetime | timedelta | float | None = None,
        status: str | Iterable[str] | None = None,
        limit: int | None = 100,
        *,
        oldest_first: bool = False,
    ) -> list[AuditRecord]:
        """Audited commands, most recent first (``oldest_first=True`` reverses the page).

        Args:
            vm_id: only this VM's commands.
            since: a datetime, an epoch timestamp, or a timedelta meaning "this long ago".
            status: one of ``ok``, ``failed``, ``blocked``, ``error`` or several of them.
            limit: at most this many records (None: all).
        """
        if isinstance(since, timedelta):
            since_ts: float | None = time.time() - since.total_seconds()
        elif since is None:
            since_ts = None
        else:
            since_ts = _epoch(since)
            if since_ts is None:
                raise ValidationError(
                    f"since must be a datetime, timedelta or epoch seconds, got {since!r}", field="since"
                )
        statuses: tuple[str, ...] | None
        if status is None:
            statuses = None
        else:
            statuses = (status,) if isinstance(status, str) else tuple(status)
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise ValidationError(
                    f"unknown status {bad[0]!r}; use one of {', '.join(STATUSES)}", field="status"
                )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValidationError(
                f"limit must be a non-negative integer or None, got {limit!r}", field="limit"
            )
        return self.store.query(vm_id, since_ts, statuses, limit, oldest_first)

    def prune(self) -> int:
        """Apply ``retention_days`` and ``max_rows`` now; returns the number of rows deleted."""
        return self.store.prune(self.retention_days, self.max_rows)

    def close(self) -> None:
        self.store.close()

    def on_post_file(self, ctx: FileContext) -> None:
        """Every transfer, refused or not: ``[upload] /guest/path <- /host/path``."""
        arrow = "<-" if ctx.direction == "upload" else "->"
        size = f" ({ctx.size} bytes)" if ctx.size is not None else ""
        self.record_op(
            ctx.vm_id, f"[{ctx.direction}] {ctx.guest_path} {arrow} {ctx.local_path}{size}", "file", ctx.error
        )

    def on_post_env(self, ctx: EnvContext) -> None:
        """Env changes: names only (values may be secrets)."""
        what = " ".join([*(f"set {k}" for k in sorted(ctx.set)), *(f"unset {k}" for k in ctx.unset)])
        self.record_op(ctx.vm_id, f"[env] {what}", "env", ctx.error)

    def on_post_lifecycle(self, ctx: LifecycleContext) -> None:
        extra = " ".join(f"{k}={v}" for k, v in sorted(ctx.details.items()))
        self.record_op(ctx.vm_id, f"[{ctx.action}] {extra}".rstrip(), "lifecycle", ctx.error)

    def record_op(
        self,
        vm_id: str,
        what: str,
        shell: str,
        error: BaseException | None,
        *,
        started_at: float | None = None,
        channel: str | None = None,
    ) -> None:
        """Record one operation that is not a command (``shell`` names its kind): ``ok``,
        ``blocked`` (a ``CommandBlockedError``) or ``error``; ``started_at`` (epoch s)
        gives it a duration."""
        now = time.time()
        status = "ok" if error is None else "blocked" if isinstance(error, CommandBlockedError) else "error"
        row = {
            "vm_id": vm_id,
            "command": what[:4000],
            "shell": shell,
            "started_at": now if started_at is None else started_at,
            "ended_at": now,
            "duration": 0.0 if started_at is None else now - started_at,
            "status": status,
            "error": None if error is None else f"{type(error).__name__}: {error}"[:1000],
            "channel": channel,
        }
        if isinstance(error, CommandBlockedError):
            row["blocked_by"] = str(error.details.get("guard") or "SafetyGuard")
        self._write(row)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AuditLog(db_path={str(self.db_path)!r}, retention_days={self.retention_days}, "
            f"max_rows={self.max_rows})"
        )

    # ------------------------------------------------------------------ internals

    def _base_row(self, ctx: RunContext, result_duration: float | None = None) -> dict[str, Any]:
        now_wall, now_mono = time.time(), time.monotonic()
        with self._lock:
            p = self._pending.pop(id(ctx), None)
        if p is not None and (p.vm_id != ctx.vm_id or p.command != ctx.command):
            p = None  # a stale entry whose context id was reused
        ctx_start = _epoch(getattr(ctx, "started_at", None))
        if p is not None:
            started, measured = p.wall, now_mono - p.mono
        elif ctx_start is not None:
            started, measured = ctx_start, max(0.0, now_wall - ctx_start)
        else:
            measured = result_duration if result_duration else 0.0
            started = now_wall - measured
        duration = result_duration if result_duration else measured
        timeout = ctx.timeout
        return {
            "vm_id": ctx.vm_id,
            "command": ctx.command,
            "shell": ctx.shell,
            "timeout": float(timeout)
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
            else None,
            "started_at": started,
            "ended_at": now_wall,
            "duration": duration,
            "channel": getattr(ctx, "channel", None),
        }

    def _cut(self, text: str | None) -> tuple[str | None, bool]:
        if text is None:
            return None, False
        raw = text.encode("utf-8", "surrogatepass")
        if len(raw) <= self.max_output_bytes:
            return text, False
        return raw[: self.max_output_bytes].decode("utf-8", "ignore"), True

    def _write(
        self,
        row: dict[str, Any],
        stdout: str | None = None,
        stderr: str | None = None,
        truncated: bool = False,
    ) -> None:
        if self._safe(self.store.insert, row, stdout, stderr, truncated) is None:
            return
        with self._lock:
            self._writes += 1
            due = self.prune_every is not None and self._writes % self.prune_every == 0
        if due:
            self._safe(self.prune)

    def _safe(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (sqlite3.Error, OSError, SmolVMError) as exc:
            with self._lock:
                self.write_errors += 1
            log.warning("AuditLog: %s failed on %s: %s", getattr(fn, "__name__", fn), self.db_path, exc)
            return None


__all__ = ["AuditLog", "AuditRecord", "AuditStore", "STATUSES", "default_db_path"]
