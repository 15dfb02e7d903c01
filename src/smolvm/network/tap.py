"""``network="tap"``: a TAP device per VM, routed and NATed by the host with nftables (root).

Each VM leases a /30 from a private pool (``$SMOLVM_TAP_SUBNET``, default 172.30.0.0/16):
``.1`` is the host end (the TAP's address, the guest's gateway), ``.2`` the guest. The TAP
is called ``smv-<id>`` (at most 15 characters). All rules live in one nftables table,
``ip smolvm``, and every rule of a VM carries the comment ``smolvm:<vm_id>:<tap>`` so that
release removes exactly that VM's rules:

* ``nat_postrouting``: the guest's traffic leaving through any non-TAP interface is
  masqueraded.
* ``input`` / ``forward``: the egress policy (``policy.tap_input_rules``/``tap_vm_rules``):
  no host service, no other TAP, no private or link-local range unless allowed.

Forwards (SSH on a reserved port, ``port_forwards``, ``expose_local``) are ``socat`` relays
on 127.0.0.1 (``forwarder.py``), not DNATs of 127.0.0.1: those need ``route_localnet`` on
the TAP, which would route loopback addresses to and from the guest.

Every host resource is recorded in the state store *before* it is created (kinds
``lease`` — the /30 itself, taken atomically by a UNIQUE insert —, ``tap``, ``nft`` and the
ports), so ``SmolVMManager.reconcile()`` can remove it after a crash. A host-wide lock
(``/run/smolvm/tap.lock``) serialises allocations of different state stores (data dirs),
which also avoid each other's subnets by looking at the addresses present on the host.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smolvm import procs
from smolvm.exceptions import NetworkError
from smolvm.locks import file_lock
from smolvm.network import forwarder, policy
from smolvm.network.ports import mac_for, reserve_ports
from smolvm.state import StateStore
from smolvm.types import InternetSettings, NetworkInfo

log = logging.getLogger("smolvm.network")

POOL_ENV = "SMOLVM_TAP_SUBNET"
DEFAULT_POOL = "172.30.0.0/16"
LEASE_PREFIX = 30
TAP_PREFIX = "smv-"
IFNAMSIZ = 15
NFT_FAMILY = "ip"
NFT_TABLE = "smolvm"
CHAIN_POSTROUTING = "nat_postrouting"
CHAIN_FORWARD = "forward"
CHAIN_INPUT = "input"
ISOLATE_TAG = "smolvm:isolate"
INPUT_TAG = "smolvm:input"
SHARED_TAGS = (ISOLATE_TAG, INPUT_TAG)
LOCK_PATH = Path("/run/smolvm/tap.lock")
CAP_NET_ADMIN = 12


# ---------------------------------------------------------------------------- names
def tap_name(vm_id: str) -> str:
    """``smv-<vm_id>`` when it fits in IFNAMSIZ (15), else ``smv-`` + 11 hex of its hash."""
    if len(TAP_PREFIX) + len(vm_id) <= IFNAMSIZ:
        return TAP_PREFIX + vm_id
    return TAP_PREFIX + hashlib.sha256(vm_id.encode()).hexdigest()[: IFNAMSIZ - len(TAP_PREFIX)]


def rule_tag(vm_id: str, tap: str) -> str:
    """The comment on every nftables rule of one VM (also the ``nft`` resource value)."""
    return f"smolvm:{vm_id}:{tap}"


def pool() -> ipaddress.IPv4Network:
    raw = os.environ.get(POOL_ENV, DEFAULT_POOL)
    try:
        net = ipaddress.ip_network(raw, strict=False)
    except ValueError as exc:
        raise NetworkError(f"${POOL_ENV}={raw!r} is not an IPv4 network: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > LEASE_PREFIX:
        raise NetworkError(f"${POOL_ENV}={raw!r} must be an IPv4 network of /{LEASE_PREFIX} or larger")
    return net


def prefix_of(netmask: str | None, default: int = 24) -> int:
    """Prefix length of a dotted netmask (``255.255.255.252`` → 30)."""
    if not netmask:
        return default
    return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def guest_dns(gateway: str | None, resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The host's first non-loopback IPv4 nameserver (we run no resolver on the gateway);
    the gateway only when the host has none (e.g. a 127.0.0.53 stub)."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if ip.version == 4 and not ip.is_loopback and not ip.is_unspecified:
                return str(ip)
    return gateway or ""


# ---------------------------------------------------------------------------- privileges
def _has_cap_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def require_root() -> None:
    if os.geteuid() != 0 or not _has_cap_net_admin():
        raise NetworkError(
            "network='tap' needs root (CAP_NET_ADMIN) to create TAP devices and nftables rules; "
            "run as root or use network='user' (rootless, SSH and port forwards on 127.0.0.1)",
            {"euid": os.geteuid()},
        )


@contextmanager
def host_lock() -> Iterator[None]:
    """Host-wide lock: serialises TAP/nft changes of every SmolVM process and data dir."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with file_lock(LOCK_PATH):
        yield


# ---------------------------------------------------------------------------- nftables
def _nft_bin() -> str:
    path = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if not path:
        raise NetworkError("nft not found: apt-get install nftables (needed by network='tap')")
    return path


def nft_apply(commands: list[dict[str, Any]]) -> None:
    """Apply a batch of nftables JSON commands atomically (``nft -j -f -``)."""
    payload = json.dumps({"nftables": commands})
    proc = subprocess.run([_nft_bin(), "-j", "-f", "-"], input=payload, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"nft failed: {proc.stderr.strip()[-800:]}", {"commands": len(commands)})


def nft_rules() -> list[dict[str, Any]] | None:
    """The rules of table ``ip smolvm`` (None when the table does not exist)."""
    proc = subprocess.run(
        [_nft_bin(), "-j", "list", "table", NFT_FAMILY, NFT_TABLE], capture_output=True, text=True
    )
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise NetworkError(f"nft list table {NFT_FAMILY} {NFT_TABLE} failed: {proc.stderr.strip()}")
    items = json.loads(proc.stdout).get("nftables", [])
    return [i["rule"] for i in items if "rule" in i]


def _m(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _field(proto: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": name}}


def _rule(chain: str, comment: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {
        "add": {
            "rule": {
                "family": NFT_FAMILY,
                "table": NFT_TABLE,
                "chain": chain,
                "comment": comment,
                "expr": list(expr),
            }
        }
    }


def _base_objects() -> list[dict[str, Any]]:
    """The table and its base chains (``add`` is a no-op for ones that exist)."""
    t = {"family": NFT_FAMILY, "table": NFT_TABLE}
    return [
        {"add": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
        {
            "add": {
                "chain": {
                    **t,
                    "name": CHAIN_POSTROUTING,
                    "type": "nat",
                    "hook": "postrouting",
                    "prio": 100,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "chain": {
                    **t,
                    "name": CHAIN_INPUT,
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "chain": {
                    **t,
                    "name": CHAIN_FORWARD,
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
    ]


def vm_rules(tag: str, guest: str) -> list[dict[str, Any]]:
    """nftables commands adding one VM's NAT: its own traffic leaving the host (not
    towards another TAP) is masqueraded."""
    return [
        _rule(
            CHAIN_POSTROUTING,
            tag,
            _m(_field("ip", "saddr"), guest),
            _m(_meta("oifname"), TAP_PREFIX + "*", "!="),
            {"masquerade": None},
        )
    ]


def _shared_rules(existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules all TAP VMs share, unless the table has them already."""
    tags = {r.get("comment") for r in existing}
    out = [] if ISOLATE_TAG in tags else [_isolation_rule()]
    if INPUT_TAG not in tags:
        out += policy.tap_input_rules(NFT_TABLE, CHAIN_INPUT, INPUT_TAG, TAP_PREFIX)
    return out


def policy_rules(tag: str, tap: str, guest: str, settings: InternetSettings) -> list[dict[str, Any]]:
    """One VM's egress policy (see :func:`policy.tap_vm_rules`)."""
    dns = settings.dns_servers or [guest_dns(None)]
    return policy.tap_vm_rules(
        NFT_TABLE, CHAIN_INPUT, CHAIN_FORWARD, tag, tap, guest, settings, [d for d in dns if d]
    )


def _isolation_rule() -> dict[str, Any]:
    return _rule(
        CHAIN_FORWARD,
        ISOLATE_TAG,
        _m(_meta("iifname"), TAP_PREFIX + "*"),
        _m(_meta("oifname"), TAP_PREFIX + "*"),
        {"counter": None},
        {"drop": None},
    )


def delete_nft_rules(tag: str) -> None:
    """Remove every rule whose comment is ``tag``; drop the table once no VM rule is left.
    Idempotent (a missing table or rule is not an error)."""
    with host_lock():
        for attempt in range(3):
            rules = nft_rules()
            if rules is None:
                return
            mine = [r for r in rules if r.get("comment") == tag]
            others = [r for r in rules if r.get("comment") not in (tag, *SHARED_TAGS)]
            cmds: list[dict[str, Any]] = [
                {
                    "delete": {
                        "rule": {
                            "family": NFT_FAMILY,
                            "table": NFT_TABLE,
                            "chain": r["chain"],
                            "handle": r["handle"],
                        }
                    }
                }
                for r in mine
            ]
            if not others:
                cmds = [{"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}}]
            if not cmds:
                return
            try:
                nft_apply(cmds)
                return
            except NetworkError:
                if attempt == 2:
                    raise
                time.sleep(0.05)


# ---------------------------------------------------------------------------- links
def _ipr() -> Any:
    try:
        from pyroute2 import IPRoute  # ~150 ms to import: only TAP users pay it
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise NetworkError("pyroute2 is missing: pip install pyroute2 (needed by network='tap')") from exc
    return IPRoute()


def _host_networks(ipr: Any) -> tuple[list[ipaddress.IPv4Network], set[str]]:
    """Networks of the host's non-TAP addresses, and names of existing links."""
    index_name = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    nets = []
    for a in ipr.get_addr(family=2):
        addr = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
        if not addr:
            continue
        iface = ipaddress.IPv4Interface(f"{addr}/{a['prefixlen']}")
        if (index_name.get(a["index"]) or "").startswith(TAP_PREFIX):
            nets.append(ipaddress.IPv4Network(f"{addr}/32"))  # another store's lease
        else:
            nets.append(iface.network)
    return nets, set(index_name.values())


def _set_sysctl(path: str, value: str) -> None:
    p = Path("/proc/sys") / path
    try:
        if p.read_text().strip() != value:
            p.write_text(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {path.replace('/', '.')}={value}: {exc}") from exc


def _create_tap(ipr: Any, name: str, gateway: str, prefix: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # heavy import: TAP users only

    try:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=idx, address=gateway, prefixlen=prefix)
        ipr.link("set", index=idx, state="up")
    except (NetlinkError, OSError, IndexError) as exc:
        raise NetworkError(f"cannot create TAP device {name}: {exc}", {"tap": name}) from exc


def delete_tap_device(name: str) -> None:
    """Delete a TAP device; a missing one is fine."""
    from pyroute2.netlink.exceptions import NetlinkError  # heavy import: TAP users only

    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise NetworkError(f"cannot delete TAP device {name}: {exc}", {"tap": name}) from exc


# ---------------------------------------------------------------------------- leases
def _take_lease(state: StateStore, vm_id: str, avoid: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """Record the first free /30 of the pool as this VM's ``lease`` resource (atomic: the
    resources table's UNIQUE(kind, value) and an IMMEDIATE transaction)."""
    p = pool()
    with state.tx() as conn:
        taken = {r[0] for r in conn.execute("SELECT value FROM resources WHERE kind='lease'")}
        for sub in p.subnets(new_prefix=LEASE_PREFIX):
            if str(sub) in taken or any(sub.overlaps(n) for n in avoid):
                continue
            try:
                conn.execute(
                    "INSERT INTO resources (vm_id, kind, value, created_at) VALUES (?,?,?,?)",
                    (vm_id, "lease", str(sub), time.time()),
                )
            except sqlite3.IntegrityError:
                continue
            return sub
    raise NetworkError(f"no free /{LEASE_PREFIX} left in the TAP pool {p} (set ${POOL_ENV})")


# ---------------------------------------------------------------------------- public API
def allocate_tap(
    state: StateStore, vm_id: str, forwards: dict[int, int], settings: InternetSettings | None = None
) -> NetworkInfo:
    """Lease a /30, create the VM's TAP and its NAT/forward rules; return how to reach it."""
    require_root()
    _nft_bin()
    forwarder.socat()  # its forwards need it: fail before creating anything
    tap = tap_name(vm_id)
    tag = rule_tag(vm_id, tap)
    try:
        with host_lock(), _ipr() as ipr:
            avoid, links = _host_networks(ipr)
            if tap in links:
                raise NetworkError(
                    f"a network device named {tap} already exists: another SmolVM data dir uses "
                    f"vm_id {vm_id!r}, or a crashed one left it (run `smolvm reconcile` there)",
                    {"tap": tap},
                )
            sub = _take_lease(state, vm_id, avoid)
            hosts = list(sub.hosts())
            gateway, guest = str(hosts[0]), str(hosts[1])
            state.add_resource(vm_id, "tap", tap)
            _create_tap(ipr, tap, gateway, sub.prefixlen)

            ssh_port = reserve_ports(state, vm_id, forwards)

            cmds = _base_objects() + _shared_rules(nft_rules() or [])
            cmds += vm_rules(tag, guest)
            cmds += policy_rules(tag, tap, guest, settings or InternetSettings())
            state.add_resource(vm_id, "nft", tag)
            nft_apply(cmds)
            _set_sysctl("net/ipv4/ip_forward", "1")
    except BaseException:
        try:
            release_tap(state, vm_id, None)
            state.release_ports(vm_id)
        except Exception as exc:  # keep the original error; reconcile retries the rest
            log.warning("cleanup after failed TAP allocation for %s: %s", vm_id, exc)
        raise
    return NetworkInfo(
        mode="tap",
        guest_ip=guest,
        gateway_ip=gateway,
        netmask=str(sub.netmask),
        tap_device=tap,
        mac_address=mac_for(vm_id),
        ssh_host_port=ssh_port,
        port_forwards={int(h): int(g) for h, g in forwards.items()},
    )


def start_forwards(state: StateStore, vm_id: str, net: NetworkInfo) -> None:
    """Before a TAP VM starts: its relays for SSH and ``port_forwards`` (helpers)."""
    fwd = {net.ssh_host_port: 22} if net.ssh_host_port else {}
    fwd.update({int(h): int(g) for h, g in net.port_forwards.items()})
    for h, g in fwd.items():
        add_forward(state, vm_id, net, h, g)


def add_forward(state: StateStore, vm_id: str, net: NetworkInfo, host_port: int, guest_port: int) -> None:
    """Relay ``127.0.0.1:host_port`` to the guest's ``guest_port`` (a recorded helper)."""
    if not net.guest_ip:
        raise NetworkError(f"VM {vm_id} has no TAP lease recorded; delete and re-create it")
    forwarder.start(
        host_port,
        net.guest_ip,
        guest_port,
        lambda pid: state.add_resource(vm_id, "helper", procs.process_token(pid)),
    )


def remove_forward(state: StateStore, vm_id: str, host_port: int) -> None:
    """Stop the relay of ``host_port`` (idempotent)."""
    for r in state.resources(vm_id, "helper"):
        pid = int(r["value"].split(":")[0])
        if procs.is_alive(pid, r["value"]) and forwarder.serves(pid, host_port):
            procs.kill(pid, r["value"])
            procs.wait_gone(pid, 5.0, r["value"])
            state.remove_resource("helper", r["value"])


def remove_resource(kind: str, value: str) -> None:
    """Undo one recorded host resource of kind ``tap``, ``nft`` or ``lease`` (idempotent).
    A lease is only a state row: its address disappears with the TAP."""
    if kind == "tap":
        delete_tap_device(value)
    elif kind == "nft":
        delete_nft_rules(value)


def release_tap(state: StateStore, vm_id: str, net: NetworkInfo | None = None) -> None:
    """Remove the VM's nftables rules, its TAP and its lease. Idempotent; pieces that are
    already gone are skipped. Ports are released by the caller (``NetworkManager.release``)."""
    order = {"nft": 0, "tap": 1, "lease": 2}
    rows = [r for r in state.resources(vm_id) if r["kind"] in order]
    for r in sorted(rows, key=lambda r: order[r["kind"]]):
        remove_resource(r["kind"], r["value"])
        state.remove_resource(r["kind"], r["value"])


def ensure_tap(
    state: StateStore, vm_id: str, net: NetworkInfo, settings: InternetSettings | None = None
) -> None:
    """Before (re)starting a TAP VM: re-create its device and rules if they are gone (e.g.
    after a host reboot), from the lease and forwards already recorded in state."""
    if not net.tap_device or not net.gateway_ip or not net.guest_ip:
        raise NetworkError(f"VM {vm_id} has no TAP lease recorded; delete and re-create it")
    require_root()
    tag = rule_tag(vm_id, net.tap_device)
    with _ipr() as ipr:
        if ipr.link_lookup(ifname=net.tap_device):
            return
    delete_nft_rules(tag)  # stale rules of this VM, if any (takes the host lock itself)
    with host_lock(), _ipr() as ipr:
        state.add_resource(vm_id, "tap", net.tap_device)
        _create_tap(ipr, net.tap_device, net.gateway_ip, prefix_of(net.netmask))
        cmds = _base_objects() + _shared_rules(nft_rules() or [])
        cmds += vm_rules(tag, net.guest_ip)
        cmds += policy_rules(tag, net.tap_device, net.guest_ip, settings or InternetSettings())
        state.add_resource(vm_id, "nft", tag)
        nft_apply(cmds)
        _set_sysctl("net/ipv4/ip_forward", "1")
