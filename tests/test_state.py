"""The SQLite state store: schema, permissions, atomic allocation across processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from smolvm import VMAlreadyExistsError, VMNotFoundError, VMState
from smolvm.state import SCHEMA_VERSION, StateStore


def test_schema_and_modes(tmp_path: Path):
    s = StateStore(tmp_path / "state.db")
    assert s.schema_version() == SCHEMA_VERSION
    assert s.connect().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) == 0o600
    assert s.integrity_check() == "ok"
    s.close()
    s.close()  # idempotent
    # Re-opening an up-to-date database runs no migration and keeps data.
    s2 = StateStore(tmp_path / "state.db")
    assert s2.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path):
    s = StateStore(tmp_path / "state.db")
    s.connect().execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    s.close()
    from smolvm.state import StateError

    with pytest.raises(StateError, match="newer"):
        StateStore(tmp_path / "state.db")


def test_vm_rows(tmp_path: Path):
    s = StateStore(tmp_path / "state.db")
    s.insert_vm("a", status="created", backend="qemu", config={"x": 1})
    with pytest.raises(VMAlreadyExistsError):
        s.insert_vm("a", status="created", backend="qemu", config={})
    s.update_vm("a", status="running", pid=5)
    assert s.get_vm("a").status is VMState.RUNNING
    assert [r.vm_id for r in s.list_vms("running")] == ["a"]
    with pytest.raises(VMNotFoundError):
        s.get_vm("b")
    with pytest.raises(VMNotFoundError):
        s.update_vm("b", status="x")
    s.add_resource("a", "file", "/tmp/x")
    s.delete_vm("a")
    assert s.resources("a") == []


def test_first_open_by_many_threads_at_once(tmp_path: Path):
    """A new file opened by several threads at once (two AsyncSmolVM()s in one gather):
    SQLite refuses the switch to WAL at once, without waiting, while another opener holds
    the write lock, so openers take turns."""
    import threading

    for i in range(25):
        db = tmp_path / f"s{i}" / "state.db"
        errors: list[BaseException] = []

        def open_and_use(db: Path = db, errors: list[BaseException] = errors) -> None:
            try:
                StateStore(db).list_vms()
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=open_and_use) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert stat.S_IMODE(os.stat(f"{db}.lock").st_mode) == 0o600


def _reserve(db: str, vm: str, q) -> None:
    s = StateStore(db)
    got = [s.reserve_port(vm, "ssh", iter(range(40000, 40100))) for _ in range(10)]
    q.put(got)


def test_port_reservation_is_atomic_across_processes(tmp_path: Path):
    db = str(tmp_path / "state.db")
    StateStore(db).close()
    q = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_reserve, args=(db, f"vm{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = [p for r in results for p in r]
    assert len(flat) == 40 and len(set(flat)) == 40


def test_removing_a_port_resource_frees_the_port(tmp_path: Path):
    s = StateStore(tmp_path / "state.db")
    port = s.reserve_port("gone", "ssh", iter([45000]))
    s.remove_resource("port", str(port))
    assert s.ports("gone") == []
    assert s.reserve_port("new", "ssh", iter([45000])) == 45000


def _key(d: str, q) -> None:
    from smolvm.keys import ensure_client_key

    q.put(ensure_client_key(Path(d))[1])


def test_client_key_created_once_under_concurrency(tmp_path: Path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_key, args=(str(tmp_path / "keys"), q)) for _ in range(6)]
    for p in ps:
        p.start()
    pubs = {q.get(timeout=60) for _ in ps}
    for p in ps:
        p.join()
    assert len(pubs) == 1
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "id_ed25519").st_mode) == 0o600
    assert (tmp_path / "keys" / "id_ed25519.pub").read_text().strip() == pubs.pop()
