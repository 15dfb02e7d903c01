"""Named-domain egress (``allowed_domains=["pypi.org", "*.example.com"]``) in user mode.

Inside the VM's network namespace (see ``sandbox.py``):

* ``dnsmasq`` answers the guest's DNS: an allowed name (or any name under an allowed
  wildcard) resolves to the guest's gateway, every other name to nothing;
* the gateway is the namespace's loopback, where ``sniproxy`` (Debian; reads the HTTP
  ``Host`` header and the TLS SNI, no TLS interception) accepts ports 80 and 443, matches
  the name against the allowlist, resolves it with the policy's resolvers and connects out
  from a source address (:data:`SOURCE`) that only it uses;
* the namespace's rules let only that source out, to public addresses on ports 80/443,
  so a guest connecting to a bare IP, or naming another host on an allowed address, is
  refused. Both helpers drop root (``nobody``) when started as root.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from smolvm.exceptions import NetworkError
from smolvm.network.ports import wait_listening
from smolvm.types import InternetSettings

#: The namespace's resolver, on its loopback (the VMM forwards the guest's DNS to it).
LOCAL_DNS = "127.0.0.1"
#: The namespace's second address: the proxy's outbound connections come from it.
SOURCE = "10.0.2.101"
#: Loopback ports of the namespace's helpers (DNS, HTTP, HTTPS) the VMM may reach.
PROXY_PORTS = (53, 80, 443)
#: The guest's gateway: what allowed names resolve to (the VMM maps it to loopback).
GATEWAY = "10.0.2.2"


def name_pattern(domain: str) -> str:
    """A sniproxy table regex: ``pypi.org`` exactly; ``*.example.com`` any name below it."""
    if domain.startswith("*."):
        return r"^([a-z0-9-]+\.)+" + re.escape(domain[2:]) + "$"
    return "^" + re.escape(domain) + "$"


def proxy_config(d: Path, settings: InternetSettings, dns: list[str], *, drop_root: bool) -> str:
    table = "\n".join(f"    {name_pattern(n)} *" for n in settings.domains)
    servers = "\n".join(f"    nameserver {s}" for s in dns)
    listeners = "".join(
        f"listener 127.0.0.1:{port} {{\n    protocol {proto}\n    table allowed\n    source {SOURCE}\n}}\n"
        for port, proto in ((80, "http"), (443, "tls"))
    )
    return (
        ("user nobody\n" if drop_root else "")
        + f"pidfile {d / 'sniproxy.pid'}\n"
        + f"error_log {{\n    filename {d / 'sniproxy.log'}\n    priority notice\n}}\n"
        + f"resolver {{\n{servers}\n    mode ipv4_only\n}}\n"
        + listeners
        + f"table allowed {{\n{table}\n}}\n"
    )


def start(
    ns: list[str],
    d: Path,
    settings: InternetSettings,
    dns: list[str],
    record_helper: Callable[[int], None] | None,
    tool: Callable[[str], str],
) -> None:
    """Start the namespace's resolver and proxy (``ns``: the nsenter prefix)."""
    root = "--user" not in ns  # in a user namespace there is no other user to drop to
    ip = subprocess.run(
        [*ns, tool("ip"), "addr", "add", f"{SOURCE}/24", "dev", "tap0"], capture_output=True, text=True
    )
    if ip.returncode != 0:
        raise NetworkError(f"adding the proxy's address failed: {ip.stderr.strip()}")
    dnsmasq = [
        *ns,
        tool("dnsmasq"),
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-dhcp-interface=",
        f"--listen-address={LOCAL_DNS}",
        "--bind-interfaces",
        "--port=53",
        f"--pid-file={d / 'dnsmasq.pid'}",
        f"--user={'nobody' if root else 'root'}",
        *(f"--address=/{n.removeprefix('*.')}/{GATEWAY}" for n in settings.domains),
    ]
    conf = d / "sniproxy.conf"
    conf.write_text(proxy_config(d, settings, dns, drop_root=root))
    sniproxy = [*ns, tool("sniproxy"), "-f", "-c", str(conf)]
    for name, argv, listening in (
        ("dnsmasq", dnsmasq, [("udp", 53)]),
        ("sniproxy", sniproxy, [("tcp", 80), ("tcp", 443)]),
    ):
        with open(d / "egress.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        if record_helper is not None:
            record_helper(proc.pid)
        if not wait_listening(proc, listening, 10.0):
            log_path = d / "egress.log"
            tail = log_path.read_text(errors="replace")[-600:] if log_path.exists() else ""
            raise NetworkError(f"{name} did not start listening in the sandbox's namespace: {tail}")
