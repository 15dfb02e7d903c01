"""Fleet mode on a real local Ray cluster: three nodes on this machine (each its own raylet
and its own SmolVM data dir, all on 127.0.0.1), real guests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every Ray process of the test binds and talks to 127.0.0.1 only (no other address: the
# network-test rule); Ray reads this when it is imported, and its processes inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# The `ray` extra is part of the test install (scripts/setup.sh): never skipped.
import ray
from ray.cluster_utils import Cluster

from conftest import qemu_pids_for
from smolvm import SmolVMManager
from smolvm.exceptions import SandboxLostError, SnapshotNotFoundError
from smolvm.fleet import Fleet
from test_cli import smolvm

pytestmark = pytest.mark.e2e

PER_NODE = 2


class Nodes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args=self.args("head"),
        )
        self.workers = {name: self.cluster.add_node(**self.args(name)) for name in ("b", "c")}

    def args(self, name: str) -> dict:
        d = self.root / name
        d.mkdir(exist_ok=True)
        return {
            "num_cpus": 1,
            "resources": {"smolvm": PER_NODE},
            "env_vars": {"SMOLVM_DATA_DIR": str(d)},
            "include_dashboard": False,
        }

    def data_dirs(self) -> list[Path]:
        return [self.root / n for n in ("head", "b", "c")]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, default_image) -> Iterator[Nodes]:
    n = Nodes(tmp_path_factory.mktemp("fleet"))
    ray.init(address=n.cluster.address, namespace="smolvm", log_to_driver=False)
    try:
        yield n
    finally:
        ray.shutdown()
        n.cluster.shutdown()
        for d in n.data_dirs():
            with SmolVMManager(data_dir=d) as m:
                m.reconcile()
                vms = m.list_vms()
            leaked = [p for v in vms for p in qemu_pids_for(v.vm_id)]
            for p in leaked:
                os.kill(p, 9)
            assert not leaked, f"QEMU left running on node dir {d}"


@pytest.fixture(scope="module")
def fleet(nodes: Nodes) -> Iterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        f.close()


def test_nodes_and_map_spread_over_the_cluster(fleet: Fleet) -> None:
    info = fleet.nodes()
    assert len(info) == 3 and all(n["capacity"] == PER_NODE and n["running"] == 0 for n in info)
    assert len({n["data_dir"] for n in info}) == 3  # each node its own data dir
    out = fleet.map(lambda sb, i: (sb.node_id, sb.run(f"echo item-{i}").output), range(12))
    assert [o for _, o in out] == [f"item-{i}" for i in range(12)]  # input order
    assert len({node for node, _ in out}) > 1  # Ray put them on more than one node
    assert fleet.map(["echo a", "echo b", "exit 3"], concurrency=2)[2].exit_code == 3


def test_fleet_status_cli(fleet: Fleet, nodes: Nodes, tmp_path: Path) -> None:
    r = smolvm(tmp_path, "fleet", "status", "--address", nodes.cluster.address, "--json")
    assert r.code == 0, str(r)
    rows = r.json()
    assert sorted(row["data_dir"] for row in rows) == sorted(str(d) for d in nodes.data_dirs())
    assert all(row["capacity"] == PER_NODE and row["running"] == 0 for row in rows)


def test_a_snapshot_made_on_one_node_starts_sandboxes_on_others(fleet: Fleet) -> None:
    with pytest.raises(SnapshotNotFoundError):
        fleet.sandbox(snapshot="never-made")
    with fleet.sandbox() as origin:
        origin.files.write("/root/prepared.txt", "made on " + (origin.node_id or ""))
        origin.snapshot("prepared")
        # The origin holds one of its node's two units: of four clones, at least two land
        # on other nodes.
        clones = [fleet.sandbox(snapshot="prepared") for _ in range(4)]
        try:
            elsewhere = [c for c in clones if c.node_id != origin.node_id]
            assert len(elsewhere) >= 2
            for c in clones:
                assert c.files.read_text("/root/prepared.txt") == f"made on {origin.node_id}"
                assert c.run("echo $((20+22))").output == "42"
        finally:
            for c in clones:
                c.delete()
    results = fleet.map(["cat /root/prepared.txt"] * 3, snapshot="prepared")
    assert {r.output for r in results} == {f"made on {origin.node_id}"}


def test_a_lost_node_fails_only_its_sandboxes(fleet: Fleet, nodes: Nodes) -> None:
    sandboxes = [fleet.sandbox() for _ in range(3 * PER_NODE)]  # every unit of every node
    victim_name = "c"
    victim = nodes.workers[victim_name]
    on_victim = {sb.vm_id for sb in sandboxes if sb.node_id == victim.node_id}
    assert len(on_victim) == PER_NODE
    outcome: dict[str, object] = {}

    def work(sb) -> None:
        try:
            outcome[sb.vm_id] = sb.run("sleep 6; echo finished", timeout=60).output
        except SandboxLostError as exc:
            outcome[sb.vm_id] = exc

    threads = [threading.Thread(target=work, args=(sb,)) for sb in sandboxes]
    for t in threads:
        t.start()
    nodes.cluster.remove_node(victim, allow_graceful=False)
    for t in threads:
        t.join(120)
    for sb in sandboxes:
        if sb.vm_id in on_victim:
            assert isinstance(outcome[sb.vm_id], SandboxLostError), outcome[sb.vm_id]
        else:
            assert outcome[sb.vm_id] == "finished"
    # New sandboxes go to live nodes.
    for sb in sandboxes:
        sb.delete()
    with fleet.sandbox() as sb:
        assert sb.node_id != victim.node_id and sb.run("echo ok").output == "ok"
    # The node's VMs died with it (lifetimes), and its host reconciles its data dir when it
    # comes back.
    for vm_id in on_victim:
        assert qemu_pids_for(vm_id) == []
    nodes.workers[victim_name] = nodes.cluster.add_node(**nodes.args(victim_name))
    info = {n["data_dir"]: n for n in fleet.nodes()}
    assert str(nodes.root / victim_name) in info and len(info) == 3
    with SmolVMManager(data_dir=nodes.root / victim_name) as m:
        assert m.list_vms() == []


def test_each_node_keeps_a_warm_pool(fleet: Fleet, nodes: Nodes) -> None:
    fleet.close()  # its hosts run without pools; this fleet's hosts keep one VM each
    with Fleet(pool_size=1) as pooled:
        deadline = time.monotonic() + 180
        while not all(n["pool_ready"] == 1 for n in pooled.nodes()):
            assert time.monotonic() < deadline, pooled.nodes()
            time.sleep(0.5)
        infos = pooled.nodes()
        assert all(n["running"] == 0 and n["pool_size"] == 1 for n in infos)  # pool VMs are not sandboxes
        before = set()
        for d in nodes.data_dirs():
            with SmolVMManager(data_dir=d) as m:
                before |= {v.vm_id for v in m.list_vms()}
        with pooled.sandbox() as sb:
            assert sb.vm_id in before  # handed out by its node's pool, not restored anew
            assert sb.run("echo pooled").output == "pooled"
