"""SQLite state store shared by every process (SDK, CLI, pool workers).

WAL mode so readers never block the writer; ``BEGIN IMMEDIATE`` for allocations so two
processes cannot take the same port or VM id. The file is created 0600.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from smolvm.exceptions import SnapshotError, StateError, VMAlreadyExistsError, VMNotFoundError
from smolvm.state.migrations import MIGRATIONS
from smolvm.state.records import SnapshotRecord, VMRecord
from smolvm.types import VMConfig, VMState

SCHEMA_VERSION = len(MIGRATIONS)


class StateStore:
    """Typed access to ``state.db``. One connection per thread; safe across processes."""

    def __init__(self, db_path: Path | str) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Switching a new file to WAL needs an exclusive lock that SQLite refuses at once
        # (no busy wait) while another opener migrates: openers take turns on a lock file.
        with _opening(self.path):
            self._migrate()

    # ------------------------------------------------------------ connections
    def connect(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own: SQLite handles must not
        cross a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StateError(f"cannot open state database {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            self._local.pid = os.getpid()
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction (takes the write lock up front)."""
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise state_error(self.path, exc) from exc
        try:
            yield conn
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                raise state_error(self.path, exc) from exc
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise state_error(self.path, exc) from exc

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        with self.tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has schema v{version}, newer than this SmolVM (v{SCHEMA_VERSION}); "
                    "upgrade smolvm or use another SMOLVM_DATA_DIR"
                )
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={i + 1}")

    def integrity_check(self) -> str:
        return self.connect().execute("PRAGMA integrity_check").fetchone()[0]

    def schema_version(self) -> int:
        return self.connect().execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------ VMs
    def insert_vm(
        self, vm_id: str, *, status: VMState, backend: str, config: VMConfig, **fields: Any
    ) -> None:
        now = time.time()
        cols = _encode(
            {
                "vm_id": vm_id,
                "status": status,
                "backend": backend,
                "config": config,
                "created_at": now,
                "updated_at": now,
                **fields,
            }
        )
        try:
            with self.tx() as conn:
                conn.execute(
                    f"INSERT INTO vms ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                    list(cols.values()),
                )
        except sqlite3.IntegrityError:
            raise VMAlreadyExistsError(vm_id) from None

    def update_vm(self, vm_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = _encode(fields)
        cols["updated_at"] = time.time()
        with self.tx() as conn:
            cur = conn.execute(
                f"UPDATE vms SET {','.join(f'{k}=?' for k in cols)} WHERE vm_id=?",
                [*cols.values(), vm_id],
            )
            if cur.rowcount == 0:
                raise VMNotFoundError(vm_id)

    def get_vm(self, vm_id: str) -> VMRecord:
        row = self.connect().execute("SELECT * FROM vms WHERE vm_id=?", (vm_id,)).fetchone()
        if row is None:
            raise VMNotFoundError(vm_id)
        return VMRecord.from_row(_decode(row))

    def vm_exists(self, vm_id: str) -> bool:
        return self.connect().execute("SELECT 1 FROM vms WHERE vm_id=?", (vm_id,)).fetchone() is not None

    def list_vms(self, status: str | None = None) -> list[VMRecord]:
        conn = self.connect()
        if status is None:
            rows = conn.execute("SELECT * FROM vms ORDER BY created_at").fetchall()
        else:
            rows = conn.execute("SELECT * FROM vms WHERE status=? ORDER BY created_at", (status,)).fetchall()
        return [VMRecord.from_row(_decode(r)) for r in rows]

    def delete_vm(self, vm_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM vms WHERE vm_id=?", (vm_id,))
            conn.execute("DELETE FROM resources WHERE vm_id=?", (vm_id,))
            conn.execute("DELETE FROM ports WHERE vm_id=?", (vm_id,))

    # ------------------------------------------------------------ resources
    def add_resource(self, vm_id: str, kind: str, value: str) -> None:
        """Record a host resource *before* creating it, so reconcile can remove it."""
        with self.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO resources (vm_id, kind, value, created_at) VALUES (?,?,?,?)",
                (vm_id, kind, str(value), time.time()),
            )

    def remove_resource(self, kind: str, value: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM resources WHERE kind=? AND value=?", (kind, str(value)))
            if kind == "port":  # the reservation itself, or the port stays taken forever
                conn.execute("DELETE FROM ports WHERE port=?", (int(value),))

    def resources(self, vm_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM resources WHERE 1=1", []
        if vm_id is not None:
            q += " AND vm_id=?"
            args.append(vm_id)
        if kind is not None:
            q += " AND kind=?"
            args.append(kind)
        return [dict(r) for r in self.connect().execute(q + " ORDER BY id", args).fetchall()]

    # ------------------------------------------------------------ ports
    def reserve_port(self, vm_id: str, purpose: str, candidates: Iterator[int]) -> int:
        """Take the first candidate port no other VM holds (atomic across processes)."""
        with self.tx() as conn:
            for port in candidates:
                try:
                    conn.execute(
                        "INSERT INTO ports (port, vm_id, purpose) VALUES (?,?,?)", (port, vm_id, purpose)
                    )
                except sqlite3.IntegrityError:
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO resources (vm_id, kind, value, created_at) VALUES (?,?,?,?)",
                    (vm_id, "port", str(port), time.time()),
                )
                return port
        raise StateError("no free port could be reserved")

    def ports(self, vm_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.connect().execute("SELECT * FROM ports WHERE vm_id=?", (vm_id,))]

    def release_port(self, vm_id: str, port: int) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM ports WHERE vm_id=? AND port=?", (vm_id, port))
            conn.execute(
                "DELETE FROM resources WHERE vm_id=? AND kind='port' AND value=?", (vm_id, str(port))
            )

    def release_ports(self, vm_id: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM ports WHERE vm_id=?", (vm_id,))
            conn.execute("DELETE FROM resources WHERE vm_id=? AND kind='port'", (vm_id,))

    # ------------------------------------------------------------ snapshots
    def insert_snapshot(
        self, name: str, *, source_vm: str | None, path: str, config: dict, meta: dict
    ) -> None:
        try:
            with self.tx() as conn:
                conn.execute(
                    "INSERT INTO snapshots (name, source_vm, path, config, meta, created_at) "
                    "VALUES (?,?,?,?,?,?)",
                    (name, source_vm, path, json.dumps(config), json.dumps(meta), time.time()),
                )
        except sqlite3.IntegrityError:
            raise SnapshotError(f"snapshot {name!r} already exists; delete it or pick another name") from None

    def get_snapshot(self, name: str) -> SnapshotRecord | None:
        row = self.connect().execute("SELECT * FROM snapshots WHERE name=?", (name,)).fetchone()
        return SnapshotRecord.from_row(_decode(row)) if row else None

    def list_snapshots(self) -> list[SnapshotRecord]:
        rows = self.connect().execute("SELECT * FROM snapshots ORDER BY created_at")
        return [SnapshotRecord.from_row(_decode(r)) for r in rows]

    def update_snapshot(self, name: str, *, meta: dict) -> None:
        with self.tx() as conn:
            conn.execute("UPDATE snapshots SET meta=? WHERE name=?", (json.dumps(meta), name))

    # ------------------------------------------------------------ pools
    def claim_pool_vm(self, pool: str, owner: str | None = None) -> str | None:
        """Atomically take the oldest paused VM of ``pool`` out of it (None if none is ready),
        now owned by ``owner`` (a process token; None: detached).

        BEGIN IMMEDIATE holds the write lock across SELECT and UPDATE, so two processes
        never get the same VM."""
        with self.tx() as conn:
            row = conn.execute(
                "SELECT vm_id FROM vms WHERE status='paused' AND pool=? ORDER BY created_at LIMIT 1", (pool,)
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE vms SET pool=NULL, pool_owner=NULL, owner=?, updated_at=? WHERE vm_id=?",
                (owner, time.time(), row[0]),
            )
            return row[0]

    def claim_vm(self, vm_id: str) -> bool:
        """Take one idle pool VM out of its pool (False if it was already handed out)."""
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE vms SET pool=NULL, pool_owner=NULL, updated_at=? "
                "WHERE vm_id=? AND pool IS NOT NULL AND status='paused'",
                (time.time(), vm_id),
            )
            return cur.rowcount == 1

    def pool_vms(self, pool: str | None = None) -> list[VMRecord]:
        """VMs that belong to a pool (``pool`` key, or every pool), oldest first."""
        conn = self.connect()
        if pool is None:
            rows = conn.execute("SELECT * FROM vms WHERE pool IS NOT NULL ORDER BY created_at").fetchall()
        else:
            rows = conn.execute("SELECT * FROM vms WHERE pool=? ORDER BY created_at", (pool,)).fetchall()
        return [VMRecord.from_row(_decode(r)) for r in rows]

    # ------------------------------------------------------------ lifetimes
    def owned_vms(self, owner: str) -> list[VMRecord]:
        """VMs that end with process ``owner``: owned ones and its pools' idle VMs."""
        rows = (
            self.connect()
            .execute(
                "SELECT * FROM vms WHERE owner=? OR (pool IS NOT NULL AND pool_owner=?) ORDER BY created_at",
                (owner, owner),
            )
            .fetchall()
        )
        return [VMRecord.from_row(_decode(r)) for r in rows]

    def owners(self) -> list[str]:
        """Every owner token of a VM or of a watchdog."""
        conn = self.connect()
        vms = conn.execute("SELECT DISTINCT owner FROM vms WHERE owner IS NOT NULL").fetchall()
        dogs = conn.execute("SELECT owner FROM watchdogs").fetchall()
        return sorted({r[0] for r in vms} | {r[0] for r in dogs})

    def add_watchdog(self, owner: str) -> None:
        """Record the watchdog of process ``owner`` before it is started."""
        with self.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO watchdogs (owner, token, created_at) VALUES (?, NULL, ?)",
                (owner, time.time()),
            )

    def set_watchdog(self, owner: str, token: str) -> None:
        with self.tx() as conn:
            conn.execute("UPDATE watchdogs SET token=? WHERE owner=?", (token, owner))

    def watchdog(self, owner: str) -> str | None:
        """The process token of ``owner``'s watchdog ("" while it is being started)."""
        row = self.connect().execute("SELECT token FROM watchdogs WHERE owner=?", (owner,)).fetchone()
        return None if row is None else (row[0] or "")

    def remove_watchdog(self, owner: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM watchdogs WHERE owner=?", (owner,))

    def delete_snapshot(self, name: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM snapshots WHERE name=?", (name,))


_JSON_COLS = {"config", "network", "meta"}


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
        if k in _JSON_COLS and not isinstance(v, str):
            v = json.dumps(v)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, VMState):
            v = v.value
        out[k] = v
    return out


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for k in _JSON_COLS & d.keys():
        if isinstance(d[k], str):
            d[k] = json.loads(d[k])
    return d


def state_error(path: Path, exc: sqlite3.Error) -> StateError:
    """A typed error for a failed SQLite call, saying what to do about it."""
    msg = str(exc)
    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < 1024 * 1024
    except OSError:
        full = False
    if full or "full" in msg:
        hint = f"the filesystem of {path.parent} is full: free space there"
    elif "locked" in msg or "busy" in msg:
        hint = "another process holds its write lock (SQLite waits 30 s): retry, or find it with `fuser`"
    else:
        hint = f"the file may be damaged: `smolvm doctor` checks it (SMOLVM_DATA_DIR={path.parent})"
    return StateError(f"state database {path}: {msg}; {hint}")


@contextmanager
def _opening(path: Path, timeout: float = 30.0) -> Iterator[None]:
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateError(
                        f"state database {path}: another process has been opening it for "
                        f"{timeout:.0f} s; find it with `fuser {path}.lock`"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _typed(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: StateStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:  # IntegrityError is mapped by the methods themselves
            raise state_error(self.path, exc) from exc

    return call


# Every public method (and opening: migrations) raises StateError, never sqlite3's errors.
for _name, _fn in list(vars(StateStore).items()):
    if callable(_fn) and (_name == "__init__" or not _name.startswith("_")) and _name not in ("tx", "close"):
        setattr(StateStore, _name, _typed(_fn))
