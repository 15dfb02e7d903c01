"""Warm pools against real guests: hand-out, refill, drain, crash reaping, atomic claims."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smolvm import SmolVM, SmolVMManager, VMConfig, VMState
from smolvm.exceptions import InvalidStateError, ValidationError
from smolvm.pools import WarmPool, default_pool
from smolvm.state import StateStore
from test_snapshots import guest_time_skew, no_leftovers, qemu_pids_for


def _claimer(db: str, pool: str, out: multiprocessing.Queue) -> None:
    store = StateStore(db)
    got = []
    while (vm_id := store.claim_pool_vm(pool)) is not None:
        got.append(vm_id)
    out.put(got)


def test_claims_are_atomic_across_processes(tmp_path: Path) -> None:
    """Many processes racing for pool VMs: every VM is handed out exactly once."""
    db = tmp_path / "state.db"
    store = StateStore(db)
    ids = [f"vm-{i:03d}" for i in range(60)]
    for vm_id in ids:
        store.insert_vm(vm_id, status="paused", backend="qemu", config={}, pool="k#1", pool_owner="1:1")
    store.insert_vm("other", status="paused", backend="qemu", config={}, pool="k#2")
    store.insert_vm("busy", status="running", backend="qemu", config={}, pool="k#1")
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(db), "k#1", q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    claimed = [v for r in results for v in r]
    assert sorted(claimed) == ids  # all of them, none twice
    for vm_id in ids:
        row = store.get_vm(vm_id)
        assert row.pool is None and row.pool_owner is None
    assert store.get_vm("other").pool == "k#2"
    assert store.claim_pool_vm("k#1") is None
    assert store.claim_vm("other") and not store.claim_vm("other")


def test_pool_rejects_bad_size(data_dir: Path) -> None:
    with pytest.raises(ValidationError):
        WarmPool(-1, data_dir=data_dir, start=False)


@pytest.mark.e2e
def test_pool_hand_out_refill_and_drain_leave_nothing(vms) -> None:
    mgr = vms.manager
    pool = mgr.pool(size=2)
    try:
        assert pool.wait_ready(timeout=120), pool.stats()
        pooled = mgr.list_vms(VMState.PAUSED)
        assert len(pooled) == 2 and all(v.pool == pool.key for v in pooled)
        assert pool.matches(VMConfig()) and pool.matches(VMConfig(env_vars={"A": "b"}))
        assert not pool.matches(VMConfig(mem_size_mib=256))
        assert not pool.matches(VMConfig(vm_id="explicit"))
        seen = []
        for i in range(3):
            pool.wait_ready(1, timeout=60)
            t0 = time.perf_counter()
            vm = SmolVM(pool=pool, env_vars={"N": str(i)})
            handout = time.perf_counter() - t0
            vms.vm_ids.append(vm.vm_id)
            assert handout < 2.0, f"hand-out took {handout:.3f} s"
            with vm:
                assert vm.info.pool is None and vm.info.status is VMState.RUNNING
                assert vm.run("hostname").output == vm.vm_id
                assert vm.run("echo $N").output == str(i)
                assert guest_time_skew(vm) <= 2
                seen.append(vm.vm_id)
            no_leftovers(mgr, [vm.vm_id])
        assert len(set(seen)) == 3 and pool.handed_out == 3
        assert pool.wait_ready(timeout=120)  # refilled
        # Resuming an idle pool VM directly takes it out of the pool.
        idle = next(v for v in mgr.list_vms(VMState.PAUSED) if v.pool == pool.key)
        vms.track(idle.vm_id)
        assert mgr.resume(idle.vm_id).pool is None
        with pytest.raises(InvalidStateError):
            mgr.resume(idle.vm_id)
        mgr.delete(idle.vm_id)
        left = [v.vm_id for v in pool.vms()]
        vms.vm_ids += left
    finally:
        pool.close()
    no_leftovers(mgr, left)
    assert [v for v in mgr.list_vms() if v.pool] == []
    assert mgr.state.resources() == [] or all(mgr.state.vm_exists(r["vm_id"]) for r in mgr.state.resources())
    assert not list(mgr.disk_dir.glob("*.qcow2"))


@pytest.mark.e2e
def test_empty_pool_falls_back_to_restore(vms) -> None:
    pool = WarmPool(1, data_dir=vms.data_dir, start=False)
    try:
        with SmolVM(pool=pool) as vm:
            vms.vm_ids.append(vm.vm_id)
            assert vm.info.snapshot and vm.info.snapshot.startswith("image:")
            assert vm.run("echo ok").output == "ok"
        assert pool.handed_out == 0
    finally:
        pool.close()


@pytest.mark.e2e
def test_pool_from_user_snapshot(vms) -> None:
    with vms.sandbox() as src:
        src.run("echo seeded > /root/seed")
        src.snapshot("seeded")
    pool = WarmPool(1, snapshot="seeded", data_dir=vms.data_dir)
    try:
        assert pool.wait_ready(timeout=120), pool.stats()
        vm = SmolVM(pool=pool)
        vms.vm_ids.append(vm.vm_id)
        with vm:
            assert vm.info.snapshot == "seeded"
            assert vm.run("cat /root/seed").output == "seeded"
    finally:
        vms.vm_ids += [v.vm_id for v in pool.vms()]
        pool.close()
    vms.manager.delete_snapshot("seeded")


@pytest.mark.e2e
def test_pool_size_env_makes_sandboxes_pooled(vms, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_POOL_SIZE", "1")
    first = vms.sandbox()  # creates the process-wide pool, which starts filling
    pool = default_pool(vms.data_dir)
    assert pool is not None and pool.size == 1
    try:
        with first:
            assert first.run("true").ok
        assert pool.wait_ready(timeout=120), pool.stats()
        second = vms.sandbox()  # seed-style manual lifecycle: start() on a handed-out VM
        try:
            second.start()
            assert second.status.value == "running" and second.run("true").ok
        finally:
            second.stop()
            second.delete()
        assert pool.handed_out == 1
        with vms.sandbox(cold_boot=True) as cold:  # explicit cold boot bypasses the pool
            assert cold.info.snapshot is None
    finally:
        vms.vm_ids += [v.vm_id for v in pool.vms()]
        pool.close()
    assert [v for v in vms.manager.list_vms() if v.pool] == []


@pytest.mark.e2e
def test_pool_of_a_dead_process_is_reaped(vms) -> None:
    """A process that dies without draining leaves paused VMs; reconcile() removes them."""
    script = textwrap.dedent(f"""
        import json, os, sys
        from smolvm.pools import WarmPool
        p = WarmPool(1, data_dir={str(vms.data_dir)!r})
        assert p.wait_ready(timeout=120), p.stats()
        print(json.dumps([v.vm_id for v in p.vms()]), flush=True)
        os._exit(0)  # no atexit drain: like a crash
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SMOLVM_DATA_DIR": str(vms.data_dir)},
    )
    assert out.returncode == 0, out.stderr
    orphans = json.loads(out.stdout.strip().splitlines()[-1])
    vms.vm_ids += orphans
    assert orphans and all(qemu_pids_for(v) for v in orphans)
    with SmolVMManager(data_dir=vms.data_dir) as mgr:
        mgr.reconcile()
        no_leftovers(mgr, orphans)
