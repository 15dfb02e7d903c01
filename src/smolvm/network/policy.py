"""Egress policy as nftables rules (JSON), enforced outside the guest.

A guest never reaches the ranges of :data:`DENY_V4`/:data:`DENY_V6` (loopback, private,
shared, link-local incl. cloud metadata, multicast, reserved) nor any address of the host,
unless ``allowed_cidrs`` names a range. ``allowed_domains=[]`` cuts all egress. The same
policy builds the rules of a user-mode sandbox's network namespace (:func:`sandbox_rules`)
and the per-TAP rules in the host's table (see ``tap.py``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from smolvm.types import InternetSettings

#: IPv4 ranges a guest never reaches unless explicitly allowed (RFC 6890 special-purpose
#: ranges; documentation ranges such as 198.51.100.0/24 count as public).
DENY_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",  # multicast, reserved, broadcast
)
DENY_V6 = (
    "::/127",  # unspecified, loopback
    "::ffff:0:0/96",  # IPv4-mapped: would bypass the IPv4 list
    "64:ff9b:1::/48",
    "100::/64",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)
TABLE = "smolvm"


def host_addresses() -> list[str]:
    """Every address of the host's interfaces (the guest must not reach the host itself)."""
    from pyroute2 import IPRoute  # heavy import, only when a sandbox starts

    with IPRoute() as ipr:
        out = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
    return sorted(a for a in out if a)


def split_families(items: list[str]) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for it in items:
        (v6 if ipaddress.ip_network(it, strict=False).version == 6 else v4).append(it)
    return v4, v6


def _prefix(net: str) -> Any:
    n = ipaddress.ip_network(net, strict=False)
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


def _set(family: str, name: str, elems: list[str]) -> list[dict[str, Any]]:
    typ = "ipv4_addr" if family == "ip" else "ipv6_addr"
    cmds: list[dict[str, Any]] = [
        {"add": {"set": {"family": "inet", "table": TABLE, "name": name, "type": typ, "flags": ["interval"]}}}
    ]
    if elems:
        nets = [ipaddress.ip_network(e, strict=False) for e in elems]
        merged: list[Any] = list(ipaddress.collapse_addresses(nets))  # type: ignore[type-var]  # one family
        cmds.append(
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": TABLE,
                        "name": name,
                        "elem": [_prefix(str(m)) for m in merged],
                    }
                }
            }
        )
    return cmds


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr(family: str) -> dict[str, Any]:
    return {"payload": {"protocol": family, "field": "daddr"}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": list(expr)}}}


def refusals(icmp: str = "icmpx") -> list[list[dict[str, Any]]]:
    """The endings of the two rules that refuse at once, counted: a TCP reset (a user-mode
    stack turns it into a refused connection for the guest; an ICMP error it would just
    drop, leaving the guest to time out), an ICMP error (``icmp``: "icmpx" in an inet
    table, "icmp" in an ip one) for everything else."""
    return [
        [_match({"meta": {"key": "l4proto"}}, "tcp"), {"counter": None}, {"reject": {"type": "tcp reset"}}],
        [{"counter": None}, {"reject": {"type": icmp, "expr": "admin-prohibited"}}],
    ]


def _reject(chain: str, *expr: dict[str, Any]) -> list[dict[str, Any]]:
    return [_rule(chain, *expr, *end) for end in refusals()]


def sandbox_rules(
    settings: InternetSettings,
    *,
    dns: list[str],
    host_addrs: list[str],
    proxy_ports: tuple[int, ...] = (),
    proxy_source: str | None = None,
) -> list[dict[str, Any]]:
    """The ruleset of a user-mode sandbox's network namespace.

    The VMM's user-mode stack turns guest connections into sockets of the namespace, so one
    ``output`` chain sees all of them: replies pass, DNS to ``dns`` on port 53 passes, then
    ``allowed_cidrs`` pass, the deny ranges and the host's addresses are rejected, and what
    is left passes only with ``allowed_domains == ["*"]``. ``proxy_ports``: local ports of
    the namespace's own resolver and proxy, the only loopback traffic let through; the
    proxy's connections (from ``proxy_source``) reach public addresses on ports 80/443.
    """
    allow4, allow6 = split_families(settings.allowed_cidrs)
    host4, host6 = split_families([a for a in host_addrs if a])
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": TABLE}}},
        {"flush": {"table": {"family": "inet", "name": TABLE}}},
        *_set("ip", "deny4", [*DENY_V4, *host4]),
        *_set("ip6", "deny6", [*DENY_V6, *host6]),
        *_set("ip", "allow4", allow4),
        *_set("ip6", "allow6", allow6),
        {
            "add": {
                "chain": {
                    "family": "inet",
                    "table": TABLE,
                    "name": "output",
                    "type": "filter",
                    "hook": "output",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        _rule("output", _match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
    ]
    for port in proxy_ports:
        cmds.append(
            _rule(
                "output",
                _match({"meta": {"key": "oifname"}}, "lo"),
                _match({"payload": {"protocol": "th", "field": "dport"}}, port),
                {"accept": None},
            )
        )
    for server in dns if settings.internet else []:  # no egress at all: not even DNS
        fam = "ip6" if ipaddress.ip_address(server).version == 6 else "ip"
        for proto in ("udp", "tcp"):
            cmds.append(
                _rule(
                    "output",
                    _match(_daddr(fam), server),
                    _match({"payload": {"protocol": proto, "field": "dport"}}, 53),
                    {"accept": None},
                )
            )
    cmds += [
        _rule("output", _match(_daddr("ip"), "@allow4"), {"accept": None}),
        _rule("output", _match(_daddr("ip6"), "@allow6"), {"accept": None}),
        *_reject("output", _match({"meta": {"key": "oifname"}}, "lo")),
        *_reject("output", _match(_daddr("ip"), "@deny4")),
        *_reject("output", _match(_daddr("ip6"), "@deny6")),
    ]
    if proxy_ports and proxy_source:
        cmds.append(
            _rule(
                "output",
                _match({"payload": {"protocol": "ip", "field": "saddr"}}, proxy_source),
                _match({"payload": {"protocol": "tcp", "field": "dport"}}, {"set": [80, 443]}),
                {"accept": None},
            )
        )
    if not settings.open_internet:
        cmds += _reject("output")
    return cmds


def resolv_conf(servers: list[str]) -> str:
    """``/etc/resolv.conf`` text naming ``servers``."""
    return "".join(f"nameserver {s}\n" for s in servers) + "options timeout:2 attempts:2\n"


# ---------------------------------------------------------------------------- TAP mode
def _tap_rule(
    table: str, chain: str, comment: str, *expr: dict[str, Any], insert: bool = False
) -> dict[str, Any]:
    body = {"family": "ip", "table": table, "chain": chain, "comment": comment, "expr": list(expr)}
    return {"insert" if insert else "add": {"rule": body}}


def _anon(nets: list[str]) -> dict[str, Any]:
    merged = ipaddress.collapse_addresses(ipaddress.IPv4Network(n, strict=False) for n in nets)
    return {"set": [_prefix(str(m)) for m in merged]}


def tap_input_rules(table: str, chain: str, comment: str, prefix: str) -> list[dict[str, Any]]:
    """Shared rules of the host's input chain: our TAPs reach no host service, only
    replies to connections the host made (forwards) pass."""
    iif = _match({"meta": {"key": "iifname"}}, prefix + "*")
    return [
        _tap_rule(
            table,
            chain,
            comment,
            iif,
            _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
            {"accept": None},
        ),
        # Refused, not dropped: a guest probing the host fails at once instead of hanging.
        *(_tap_rule(table, chain, comment, iif, *end) for end in refusals("icmp")),
    ]


def tap_vm_rules(
    table: str,
    input_chain: str,
    forward_chain: str,
    tag: str,
    tap: str,
    guest: str,
    settings: InternetSettings,
    dns: list[str],
) -> list[dict[str, Any]]:
    """One TAP VM's policy: its packets must carry its own address (no spoofing, checked
    before the shared input rules), then the forward chain applies :func:`sandbox_rules`'s
    order: replies, DNS, ``allowed_cidrs``, deny ranges, and the rest only for ``["*"]``."""
    iif = _match({"meta": {"key": "iifname"}}, tap)
    spoofed = _match({"payload": {"protocol": "ip", "field": "saddr"}}, guest, "!=")
    allow4, _ = split_families(settings.allowed_cidrs)

    def fwd(*expr: dict[str, Any]) -> dict[str, Any]:
        return _tap_rule(table, forward_chain, tag, iif, *expr)

    out = []
    if allow4:  # allowed ranges may include host addresses (local delivery: input chain)
        out.append(
            _tap_rule(
                table,
                input_chain,
                tag,
                iif,
                _match(_daddr("ip"), _anon(allow4)),
                {"accept": None},
                insert=True,
            )
        )
    out += [
        # Inserted last, so it is first: nothing with a forged source gets further.
        _tap_rule(table, input_chain, tag, iif, spoofed, {"drop": None}, insert=True),
        fwd(spoofed, {"drop": None}),
        fwd(_match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
    ]
    for server in dns if settings.internet else []:
        if ipaddress.ip_address(server).version != 4:
            continue
        for proto in ("udp", "tcp"):
            out.append(
                fwd(
                    _match(_daddr("ip"), server),
                    _match({"payload": {"protocol": proto, "field": "dport"}}, 53),
                    {"accept": None},
                )
            )
    if allow4:
        out.append(fwd(_match(_daddr("ip"), _anon(allow4)), {"accept": None}))
    deny = _match(_daddr("ip"), _anon(list(DENY_V4)))
    out += [fwd(deny, *end) for end in refusals("icmp")]
    if not settings.open_internet:
        out += [fwd(*end) for end in refusals("icmp")]
    return out


__all__ = [
    "DENY_V4",
    "DENY_V6",
    "host_addresses",
    "refusals",
    "resolv_conf",
    "sandbox_rules",
    "tap_input_rules",
    "tap_vm_rules",
]
