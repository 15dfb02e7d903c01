"""network="tap": real TAP devices, real netfilter (nftables) and real guests (root).

Traffic goes only to addresses on this machine: the guests' TAP addresses and 127.0.0.1.
Guests are never asked to reach anything outside the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import VMTracker, qemu_pids_for
from smolvm import VMConfig
from smolvm.exceptions import NetworkError
from smolvm.network import NetworkManager
from smolvm.network import tap as tapmod
from smolvm.state import StateStore
from smolvm.types import NetworkInfo

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.requires("root")


# ---------------------------------------------------------------------------- helpers
def links() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def addresses() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def ruleset_rules() -> list[dict]:
    out = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True)
    return [i["rule"] for i in json.loads(out.stdout)["nftables"] if "rule" in i]


def input_drops() -> int:
    return sum(
        e["counter"]["packets"]
        for r in rules_in(tapmod.CHAIN_INPUT)
        if r.get("comment") == tapmod.INPUT_TAG
        for e in r["expr"]
        if "counter" in e
    )


def rules_in(chain: str) -> list[dict]:
    return [r for r in ruleset_rules() if r.get("table") == tapmod.NFT_TABLE and r["chain"] == chain]


def rules_mentioning(*needles: str) -> list[dict]:
    return [r for r in ruleset_rules() if any(n in json.dumps(r) for n in needles)]


def isolation_drops() -> int:
    rule = next(r for r in ruleset_rules() if r.get("comment") == tapmod.ISOLATE_TAG)
    return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def ssh_banner(host: str, port: int, timeout: float = 10.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        return s.recv(64)


def http_get(host: str, port: int, deadline: float = 15.0) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def store(tmp_path: Path, *vm_ids: str) -> StateStore:
    st = StateStore(tmp_path / "state.db")
    for v in vm_ids:
        st.insert_vm(v, status="created", backend="qemu", config={})
    return st


def leftovers(st: StateStore, vm_id: str, net: NetworkInfo) -> dict:
    return {
        "tap": net.tap_device in links(),
        "gateway_addr": net.gateway_ip in addresses(),
        "rules": rules_mentioning(f"smolvm:{vm_id}:", f'"{net.guest_ip}"'),
        "resources": st.resources(vm_id),
        "ports": st.ports(vm_id),
    }


CLEAN = {"tap": False, "gateway_addr": False, "rules": [], "resources": [], "ports": []}


# ---------------------------------------------------------------------------- no root needed
def test_non_root_is_refused_before_touching_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(tapmod.os, "geteuid", lambda: 1000)
    st = store(tmp_path, "vm-nonroot")
    before = (links(), ruleset_rules()) if IS_ROOT else None
    with pytest.raises(NetworkError, match=r"needs root \(CAP_NET_ADMIN\).*network='user'"):
        tapmod.allocate_tap(st, "vm-nonroot", {})
    assert st.resources("vm-nonroot") == [] and st.ports("vm-nonroot") == []
    if IS_ROOT:
        assert (links(), ruleset_rules()) == before


def test_names_prefix_and_dns(tmp_path):
    assert tapmod.tap_name("vm-1a2b3c4d") == "smv-vm-1a2b3c4d"
    long = tapmod.tap_name("a-very-long-vm-identifier-" * 2)
    assert len(long) == 15 and long.startswith("smv-")
    assert long != tapmod.tap_name("a-very-long-vm-identifier-" * 3)
    assert tapmod.prefix_of("255.255.255.252") == 30 and tapmod.prefix_of(None) == 24

    rc = tmp_path / "resolv.conf"
    rc.write_text("# x\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 192.0.2.53\n")
    assert tapmod.guest_dns("172.30.0.1", rc) == "192.0.2.53"
    rc.write_text("nameserver 127.0.0.53\n")
    assert tapmod.guest_dns("172.30.0.1", rc) == "172.30.0.1"  # no usable host resolver

    net = NetworkInfo(
        mode="tap",
        guest_ip="172.30.0.6",
        gateway_ip="172.30.0.5",
        netmask="255.255.255.252",
        tap_device="smv-x",
    )
    arg = NetworkManager.kernel_arg(net)
    assert arg is not None and arg.startswith("smolvm.net=172.30.0.6/30,172.30.0.5,")
    user = NetworkInfo(mode="user", guest_ip="10.0.2.15", gateway_ip="10.0.2.2")
    assert NetworkManager.kernel_arg(user) == "smolvm.net=10.0.2.15/24,10.0.2.2,10.0.2.3"


def test_bad_pool_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVM_TAP_SUBNET", "not-a-net")
    with pytest.raises(NetworkError, match="SMOLVM_TAP_SUBNET"):
        tapmod.pool()
    monkeypatch.setenv("SMOLVM_TAP_SUBNET", "172.30.0.0/31")
    with pytest.raises(NetworkError, match="/30 or larger"):
        tapmod.pool()


# ---------------------------------------------------------------------------- root, no guest
@pytest.mark.root
@needs_root
def test_allocate_and_release_host_side(tmp_path):
    st = store(tmp_path, "vm-ta1", "vm-ta2")
    hp = free_port()
    a = tapmod.allocate_tap(st, "vm-ta1", {hp: 8080})
    b = tapmod.allocate_tap(st, "vm-ta2", {})
    try:
        assert a.mode == b.mode == "tap" and a.netmask == "255.255.255.252"
        assert a.guest_ip != b.guest_ip and a.tap_device != b.tap_device
        assert a.tap_device in links() and a.gateway_ip in addresses()
        assert a.ssh_host_port and a.port_forwards == {hp: 8080}
        assert {p["port"] for p in st.ports("vm-ta1")} == {a.ssh_host_port, hp}
        assert {r["kind"] for r in st.resources("vm-ta1")} == {"lease", "tap", "nft", "port"}
        # No route_localnet: loopback addresses are never routed to or from a guest
        # (forwards are socat relays on 127.0.0.1, started with the VM).
        assert Path(f"/proc/sys/net/ipv4/conf/{a.tap_device}/route_localnet").read_text().strip() == "0"
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"

        mine = rules_mentioning(f"smolvm:vm-ta1:{a.tap_device}")
        nat = [r for r in mine if r["chain"] == tapmod.CHAIN_POSTROUTING]
        assert len(nat) == 1  # masquerade
        assert not [r for r in ruleset_rules() if any("dnat" in e or "snat" in e for e in r["expr"])]
        # The egress policy: an anti-spoofing rule ahead of the shared input rules, and
        # forward rules ending in the deny ranges.
        assert {r["chain"] for r in mine} == {
            tapmod.CHAIN_POSTROUTING,
            tapmod.CHAIN_INPUT,
            tapmod.CHAIN_FORWARD,
        }
        assert [r["comment"] for r in rules_in(tapmod.CHAIN_INPUT)][-3:] == [tapmod.INPUT_TAG] * 3
        out = subprocess.run(
            ["nft", "list", "chain", "ip", "smolvm", "nat_postrouting"], capture_output=True, text=True
        ).stdout
        assert f'ip saddr {a.guest_ip} oifname != "smv-*" masquerade' in out
        fwd = subprocess.run(
            ["nft", "list", "chain", "ip", "smolvm", "forward"], capture_output=True, text=True
        ).stdout
        assert fwd.count(tapmod.ISOLATE_TAG) == 1  # added once, shared
        assert 'iifname "smv-*" oifname "smv-*" counter' in fwd

        tapmod.release_tap(st, "vm-ta1", a)
        tapmod.release_tap(st, "vm-ta1", a)  # idempotent
        st.release_ports("vm-ta1")
        assert leftovers(st, "vm-ta1", a) == CLEAN
        assert b.tap_device in links() and rules_mentioning("smolvm:vm-ta2:")
    finally:
        for v, n in (("vm-ta1", a), ("vm-ta2", b)):
            tapmod.release_tap(st, v, n)
            st.release_ports(v)
    assert leftovers(st, "vm-ta2", b) == CLEAN
    # The last VM gone, the table goes too.
    assert subprocess.run(["nft", "list", "table", "ip", "smolvm"], capture_output=True).returncode != 0


@pytest.mark.root
@needs_root
def test_release_tolerates_missing_pieces(tmp_path):
    st = store(tmp_path, "vm-tm")
    n = tapmod.allocate_tap(st, "vm-tm", {})
    # Someone removed the TAP and flushed our table behind our back.
    subprocess.run(["ip", "link", "del", n.tap_device], check=True)
    subprocess.run(["nft", "delete", "table", "ip", "smolvm"], check=True)
    tapmod.release_tap(st, "vm-tm", n)
    st.release_ports("vm-tm")
    assert leftovers(st, "vm-tm", n) == CLEAN


@pytest.mark.root
@needs_root
def test_failed_allocation_leaves_nothing(tmp_path, monkeypatch):
    st = store(tmp_path, "vm-tf1", "vm-tf2", "vm-tf3")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(NetworkError, match=f"host port {port}"):
            tapmod.allocate_tap(st, "vm-tf1", {port: 80})
    assert st.resources("vm-tf1") == [] and st.ports("vm-tf1") == []
    assert tapmod.tap_name("vm-tf1") not in links() and not rules_mentioning("smolvm:vm-tf1:")

    # A pool with room for one /30: the second VM gets a clear error and leaves nothing.
    monkeypatch.setenv("SMOLVM_TAP_SUBNET", "172.31.254.0/30")
    n = tapmod.allocate_tap(st, "vm-tf2", {})
    try:
        assert n.guest_ip == "172.31.254.2" and n.gateway_ip == "172.31.254.1"
        with pytest.raises(NetworkError, match="no free /30"):
            tapmod.allocate_tap(st, "vm-tf3", {})
        assert st.resources("vm-tf3") == [] and tapmod.tap_name("vm-tf3") not in links()
    finally:
        tapmod.release_tap(st, "vm-tf2", n)
        st.release_ports("vm-tf2")


@pytest.mark.root
@needs_root
def test_concurrent_allocations_across_processes_and_stores(tmp_path):
    """Six processes allocate at once: four share one state store, two use a second one
    (another data dir). Every VM gets its own /30 and TAP."""
    script = textwrap.dedent("""
        import json, sys
        from smolvm.state import StateStore
        from smolvm.network.tap import allocate_tap
        db, vm_id = sys.argv[1], sys.argv[2]
        st = StateStore(db)
        st.insert_vm(vm_id, status="created", backend="qemu", config={})
        print(json.dumps(allocate_tap(st, vm_id, {}).model_dump()))
    """)
    dbs = [tmp_path / "a" / "state.db"] * 4 + [tmp_path / "b" / "state.db"] * 2
    for db in set(dbs):
        StateStore(db).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(db), f"vm-cc{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, db in enumerate(dbs)
    ]
    nets = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            nets.append(NetworkInfo.model_validate_json(out))
        assert len({n.guest_ip for n in nets}) == 6
        assert len({n.tap_device for n in nets}) == 6
        assert len({n.ssh_host_port for n in nets[:4]}) == 4
        assert {n.tap_device for n in nets} <= links()
    finally:
        for i, db in enumerate(dbs):
            st = StateStore(db)
            tapmod.release_tap(st, f"vm-cc{i}")
            st.close()
    assert not ({n.tap_device for n in nets} & links())
    assert not rules_mentioning("smolvm:vm-cc")


# ---------------------------------------------------------------------------- real guests
@pytest.fixture(scope="module")
def tap_pair(tmp_path_factory, default_image):
    """Two running TAP guests: "ssh" (commands over SSH, one forward) and "agent"."""
    tracker = VMTracker(tmp_path_factory.mktemp("tap"))
    port = free_port()
    try:
        a = tracker.sandbox(VMConfig(network="tap", comm_channel="ssh", port_forwards={port: 8080}))
        b = tracker.sandbox(VMConfig(network="tap"))
        a.start()
        b.start()
        yield {"ssh": a, "agent": b, "port": port, "tracker": tracker}
    finally:
        leaked = tracker.cleanup()
        assert not leaked


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_guest_has_leased_address(tap_pair):
    for vm in (tap_pair["ssh"], tap_pair["agent"]):
        net = vm.info.network
        assert net.mode == "tap" and net.tap_device in links()
        out = vm.run("ip -4 addr show dev eth0; ip route", shell="raw").stdout
        assert f"inet {net.guest_ip}/30" in out, out
        assert f"default via {net.gateway_ip}" in out, out
        assert vm.get_ip() == net.guest_ip
    a, b = tap_pair["ssh"].info.network, tap_pair["agent"].info.network
    assert a.guest_ip != b.guest_ip and a.gateway_ip != b.gateway_ip and a.tap_device != b.tap_device


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_host_reaches_guest_directly_and_through_forward(tap_pair):
    vm = tap_pair["ssh"]
    ip = vm.info.network.guest_ip
    vm.run(f"mkdir -p /tmp/www && echo hello-from-{vm.vm_id} > /tmp/www/index.html", shell="raw")
    h = vm.spawn(f"exec busybox httpd -f -p {ip}:8080 -h /tmp/www", shell="raw")
    try:
        assert http_get(ip, 8080).strip() == f"hello-from-{vm.vm_id}"  # routed via the TAP
        assert http_get("127.0.0.1", tap_pair["port"]).strip() == f"hello-from-{vm.vm_id}"  # DNAT
    finally:
        h.kill()


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_ssh_over_tap(tap_pair):
    vm = tap_pair["ssh"]
    net = vm.info.network
    r = vm.run("echo over-ssh; id -u")
    assert vm.channel == "ssh" and r.stdout == "over-ssh\n0\n"
    assert ssh_banner(net.guest_ip, 22).startswith(b"SSH-2.0-")
    assert ssh_banner("127.0.0.1", net.ssh_host_port).startswith(b"SSH-2.0-")  # reserved forward
    cmds = vm.ssh_commands()
    assert net.guest_ip in cmds["private_ip"] and str(net.ssh_host_port) in cmds["localhost_port"]


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_guests_cannot_reach_each_other(tap_pair):
    a, b = tap_pair["ssh"], tap_pair["agent"]
    b_ip = b.info.network.guest_ip
    before = isolation_drops()
    # Both ends are guests on this host; the shared forward rule drops TAP-to-TAP traffic.
    r = a.run(f"busybox nc -w 2 {b_ip} 22 </dev/null; echo rc=$?", shell="raw", timeout=30)
    assert "SSH-2.0" not in r.stdout
    assert isolation_drops() > before  # dropped by our rule, not lost some other way
    # The host itself (the gateway) is off-limits too: the shared input rule drops it.
    gw = a.info.network.gateway_ip
    drops = input_drops()
    assert a.run(f"busybox ping -c 1 -W 2 {gw} >/dev/null || echo down", shell="raw").output == "down"
    assert input_drops() > drops


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_delete_removes_everything(tap_pair):
    mgr = tap_pair["tracker"].manager
    for key in ("ssh", "agent"):
        vm = tap_pair[key]
        info = vm.info
        net = info.network
        vm.delete()
        assert qemu_pids_for(info.vm_id) == []
        assert leftovers(mgr.state, info.vm_id, net) == CLEAN
        assert not [r for r in mgr.state.resources() if r["kind"] == "lease" and r["vm_id"] == info.vm_id]
    assert connect_refused(tap_pair["port"])
    assert not rules_mentioning("smolvm:vm-")  # no VM's rules left (the table is gone too)


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_reconcile_after_crash_removes_tap_and_rules(vms):
    mgr = vms.manager
    vm_id = vms.track("tap-crash")
    info = mgr.create(VMConfig(vm_id=vm_id, network="tap", port_forwards={free_port(): 80}))
    net = info.network
    info = mgr.start(vm_id)
    assert vm_id in (r["vm_id"] for r in mgr.state.resources(kind="tap"))
    assert net.tap_device in links() and rules_mentioning(f"smolvm:{vm_id}:")
    # The SDK process "dies": its VM row is gone, but every host resource is still recorded.
    with mgr.state.tx() as conn:
        conn.execute("DELETE FROM vms WHERE vm_id=?", (vm_id,))
    mgr.reconcile()
    assert qemu_pids_for(vm_id) == []
    assert net.tap_device not in links() and net.gateway_ip not in addresses()
    assert rules_mentioning(f"smolvm:{vm_id}:", f'"{net.guest_ip}"') == []
    assert mgr.state.resources(vm_id) == []


@pytest.mark.root
@pytest.mark.e2e
@needs_root
def test_restart_recreates_tap_lost_with_a_host_reboot(vms):
    vm = vms.sandbox(VMConfig(network="tap")).start()
    net = vm.info.network
    vm.stop()
    tapmod.delete_tap_device(net.tap_device)  # what a host reboot does to the TAP
    tapmod.delete_nft_rules(tapmod.rule_tag(vm.vm_id, net.tap_device))
    assert net.tap_device not in links()
    vm.start()
    assert net.tap_device in links() and rules_mentioning(f"smolvm:{vm.vm_id}:")
    assert net.guest_ip in vm.run("ip -4 addr show eth0").output
    # The TAP carries traffic again: the forward reaches the guest's SSH server.
    assert ssh_banner("127.0.0.1", net.ssh_host_port).startswith(b"SSH-2.0-")
    vm.delete()
    assert net.tap_device not in links()
