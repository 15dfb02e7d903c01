"""AuditLog with real SQLite files in tmp dirs (callbacks called directly)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smolvm.callbacks import Callback, RunContext
from smolvm.exceptions import CommandBlockedError, TransportError, ValidationError
from smolvm.guards import SafetyGuard
from smolvm.guards.audit import AuditLog, AuditStore
from smolvm.types import CommandResult


def _ctx(command: str = "echo hi", vm_id: str = "vm-a", timeout: int = 30) -> RunContext:
    return RunContext(vm_id=vm_id, command=command, shell="login", timeout=timeout)


def _run(
    log: AuditLog,
    ctx: RunContext,
    exit_code: int = 0,
    out: bytes = b"hi\n",
    err: bytes = b"",
    duration: float = 0.0,
) -> None:
    log.on_pre_run(ctx)
    ctx.result = CommandResult.from_bytes(exit_code, out, err, duration)
    log.on_post_run(ctx)


def test_ok_failed_error_blocked(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.db")
    _run(log, _ctx("echo hi"), out=b"hi\n")
    _run(log, _ctx("false"), exit_code=1, out=b"", err=b"boom\n")

    ctx = _ctx("uname -a")
    log.on_pre_run(ctx)
    ctx.error = TransportError("channel closed")
    log.on_run_error(ctx)

    ctx = _ctx("rm -rf /")
    guard = SafetyGuard()
    log.on_pre_run(ctx)
    with pytest.raises(CommandBlockedError) as ei:
        guard.on_pre_run(ctx)
    log.on_blocked(ctx, ei.value)

    recs = log.query(oldest_first=True)
    assert [r.status for r in recs] == ["ok", "failed", "error", "blocked"]
    ok, failed, error, blocked = recs
    assert ok.vm_id == "vm-a" and ok.command == "echo hi" and ok.shell == "login" and ok.timeout == 30
    assert ok.exit_code == 0 and ok.stdout_bytes == 3 and ok.stderr_bytes == 0
    assert failed.exit_code == 1 and failed.stderr_bytes == 5
    assert error.exit_code is None and error.error == "TransportError: channel closed"
    assert blocked.exit_code is None
    assert blocked.blocked_by is not None and blocked.blocked_by.startswith("SafetyGuard: ")
    assert "recursive-delete" in blocked.blocked_by
    for r in recs:
        assert r.started_at.tzinfo is not None and r.ended_at is not None
        assert r.ended_at >= r.started_at and r.duration is not None and r.duration >= 0
        assert r.stdout is None  # capture_output off
    assert log.write_errors == 0


def test_times_and_duration(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    ctx = _ctx("sleep 0.2")
    before = time.time()
    log.on_pre_run(ctx)
    time.sleep(0.2)
    ctx.result = CommandResult(0, "", "")  # duration not measured by the transport
    log.on_post_run(ctx)
    (rec,) = log.query()
    assert before - 0.01 <= rec.started_at.timestamp() <= before + 0.05
    assert 0.19 <= rec.duration <= 2.0  # type: ignore[operator]
    # the transport's own measurement wins when present
    _run(log, _ctx("x"), duration=1.5)
    assert log.query(limit=1)[0].duration == 1.5


def test_started_at_from_context_and_without_pre_hook(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    ctx = _ctx("make")
    t0 = time.time() - 5
    ctx.started_at = t0  # type: ignore[attr-defined]  # a facade may set this
    ctx.result = CommandResult(0, "", "", 0.0)
    log.on_post_run(ctx)  # no on_pre_run (e.g. registered after a vetoing guard)
    (rec,) = log.query()
    assert abs(rec.started_at.timestamp() - t0) < 1e-3
    assert 4.9 <= rec.duration <= 7  # type: ignore[operator]

    ctx = _ctx("rm -rf /")
    log.on_blocked(ctx, CommandBlockedError("nope", vm_id="vm-a", command="rm -rf /"))
    rec = log.query(status="blocked")[0]
    assert rec.blocked_by == "CommandBlockedError: nope"
    assert rec.duration == 0.0


def test_pre_run_hook_crash_is_error(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    ctx = _ctx("ls")
    log.on_pre_run(ctx)
    log.on_blocked(ctx, ValueError("bug in a callback"))
    (rec,) = log.query()
    assert rec.status == "error" and "ValueError: bug in a callback" in (rec.error or "")


@pytest.mark.e2e
def test_through_facade_dispatch(shared_vm, tmp_path: Path) -> None:
    """The facade's dispatcher calls on_blocked for a veto, on a real guest, whichever
    order the guard and the log are registered in."""
    from smolvm import SmolVM

    log = AuditLog(tmp_path / "a.db")
    guard = SafetyGuard()
    for cbs in ([log, guard], [guard, log]):
        vm = SmolVM.from_id(shared_vm.vm_id, data_dir=shared_vm.data_dir, callbacks=cbs)
        try:
            with pytest.raises(CommandBlockedError):
                vm.run("mkfs.ext4 /dev/vda")
            assert vm.run("echo ok").stdout == "ok\n"
        finally:
            vm.close()
    statuses = [r.status for r in log.query(oldest_first=True)]
    assert statuses == ["blocked", "ok", "blocked", "ok"]
    assert all("filesystem-format" in (r.blocked_by or "") for r in log.query(status="blocked"))


def test_capture_output(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", capture_output=True, max_output_bytes=10)
    _run(log, _ctx("cat big"), out=b"0123456789abcdef", err=b"warn\n")
    (rec,) = log.query()
    assert rec.stdout == "0123456789" and rec.stderr == "warn\n"
    assert rec.stdout_bytes == 16  # full size is recorded even when the text is cut


def test_query_filters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    for i in range(5):
        _run(log, _ctx(f"echo {i}", vm_id="vm-a"))
    _run(log, _ctx("false", vm_id="vm-b"), exit_code=1)
    assert len(log.query()) == 6
    assert [r.command for r in log.query(vm_id="vm-a", limit=2)] == ["echo 4", "echo 3"]
    assert [r.command for r in log.query(vm_id="vm-a", limit=2, oldest_first=True)] == ["echo 3", "echo 4"]
    assert [r.vm_id for r in log.query(status="failed")] == ["vm-b"]
    assert len(log.query(status=["ok", "failed"])) == 6
    assert log.query(vm_id="nope") == []
    assert len(log.query(since=timedelta(minutes=1))) == 6
    assert log.query(since=datetime.now(UTC) + timedelta(seconds=5)) == []
    assert len(log.query(since=time.time() - 60)) == 6
    assert len(log.query(limit=None)) == 6
    with pytest.raises(ValidationError):
        log.query(status="weird")
    with pytest.raises(ValidationError):
        log.query(since="yesterday")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        log.query(limit=-1)
    d = log.query(limit=1)[0].to_dict()
    assert d["vm_id"] == "vm-b" and isinstance(d["started_at"], str)


def test_retention_pruning(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db, retention_days=1, max_rows=None, capture_output=True)
    for days_ago in (10, 3, 0.5, 0):
        ctx = _ctx(f"cmd {days_ago}")
        ctx.started_at = time.time() - days_ago * 86400  # type: ignore[attr-defined]
        ctx.result = CommandResult(0, "out", "", 0.1)
        log.on_post_run(ctx)
    assert len(log.query()) == 4
    assert log.prune() == 2
    assert sorted(r.command for r in log.query()) == ["cmd 0", "cmd 0.5"]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM audit_output").fetchone()[0] == 2  # orphans removed
    conn.close()


def test_max_rows_pruning(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", retention_days=None, max_rows=5, prune_every=None)
    for i in range(12):
        _run(log, _ctx(f"echo {i}"))
    assert log.prune() == 7
    assert [r.command for r in log.query(oldest_first=True)] == [f"echo {i}" for i in range(7, 12)]


def test_automatic_pruning(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", retention_days=None, max_rows=3, prune_every=4)
    for i in range(8):
        _run(log, _ctx(f"echo {i}"))
    assert len(log.query(limit=None)) == 3  # pruned after the 8th write


def test_validation(tmp_path: Path) -> None:
    for kw in (
        {"retention_days": 0},
        {"retention_days": -1},
        {"max_rows": 0},
        {"max_rows": 1.5},
        {"prune_every": 0},
    ):
        with pytest.raises(ValidationError):
            AuditLog(tmp_path / "a.db", **kw)  # type: ignore[arg-type]
    AuditLog(tmp_path / "a.db", retention_days=None, max_rows=None)


def test_file_mode_wal_and_state_schema(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "state.db"
    log = AuditLog(db)
    _run(log, _ctx())
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"audit_log", "audit_output"} <= tables
    conn.close()
    # the state store opens the same file and sees a current schema
    import smolvm.state as state

    store = state.StateStore(db)
    assert store.schema_version() == state.SCHEMA_VERSION
    assert store.connect().execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 1
    store.close()


def test_default_path_is_data_dir_state_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(tmp_path / "data"))
    log = AuditLog()
    assert log.db_path == (tmp_path / "data").resolve() / "state.db"
    _run(log, _ctx())
    assert (tmp_path / "data" / "state.db").is_file()


def test_db_errors_are_swallowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE audit_log")
    conn.commit()
    conn.close()
    _run(log, _ctx())  # must not raise
    assert log.write_errors == 1
    assert "AuditLog" in caplog.text


def test_shared_between_threads(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")

    def worker(n: int) -> None:
        for i in range(25):
            ctx = _ctx(f"echo {n}-{i}", vm_id=f"vm-{n}")
            log.on_pre_run(ctx)
            time.sleep(0.001)
            ctx.result = CommandResult(0, f"{n}-{i}", "")
            log.on_post_run(ctx)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = log.query(limit=None)
    assert len(recs) == 200
    assert all(r.command.split()[1].split("-")[0] == r.vm_id.split("-")[1] for r in recs)
    assert log.write_errors == 0
    assert not log._pending


def _proc_writer(db: str, name: str, n: int, barrier) -> None:  # type: ignore[no-untyped-def]
    log = AuditLog(db)
    barrier.wait()
    for i in range(n):
        _run(log, _ctx(f"echo {name} {i}", vm_id=name), out=b"x" * i)
    if log.write_errors:
        raise SystemExit(1)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_two_processes_write_concurrently(tmp_path: Path, method: str) -> None:
    db = tmp_path / "state.db"
    AuditLog(db)  # create the schema once up front is not required, but exercise reuse
    mp = multiprocessing.get_context(method)
    barrier = mp.Barrier(2)
    procs = [mp.Process(target=_proc_writer, args=(str(db), f"vm-{k}", 150, barrier)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    log = AuditLog(db)
    for k in range(2):
        recs = log.query(vm_id=f"vm-{k}", limit=None, oldest_first=True)
        assert [r.command for r in recs] == [f"echo vm-{k} {i}" for i in range(150)]
        assert [r.stdout_bytes for r in recs] == list(range(150))


def test_fresh_file_created_by_two_processes(tmp_path: Path) -> None:
    """Schema creation itself races safely."""
    db = tmp_path / "new.db"
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(2)
    procs = [mp.Process(target=_proc_writer, args=(str(db), f"vm-{k}", 20, barrier)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(AuditStore(db).query(limit=None)) == 40


def test_is_a_callback(tmp_path: Path) -> None:
    assert isinstance(AuditLog(tmp_path / "a.db"), Callback)
