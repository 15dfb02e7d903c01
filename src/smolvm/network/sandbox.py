"""Sealed user-mode networking: the VMM runs in its own network namespace.

QEMU's user-mode stack turns every guest connection into a socket of the VMM process, and
maps the guest's gateway to the loopback of wherever those sockets live. So the VMM gets a
network (and mount) namespace of its own, created before it starts:

* its uplink is ``slirp4netns`` (Debian, the rootless-podman uplink) with
  ``--disable-host-loopback``, its own seccomp filter and sandbox; it exits with the VMM
  (``--exit-fd``: the VMM holds the pipe's other end);
* an nftables ruleset inside the namespace (:func:`policy.sandbox_rules`) rejects the host's
  loopback and addresses, private/link-local/metadata ranges, other sandboxes and, per
  :class:`InternetSettings`, the rest;
* ``/etc/resolv.conf`` is bind-mounted in the namespace so the guest's DNS goes to the
  policy's resolvers;
* forwards (SSH, ``expose_local``) are host ``127.0.0.1:H`` → namespace ``:H`` (slirp4netns
  API) → guest port (QEMU ``hostfwd``).

Without root the namespace is also a user namespace (``--map-root-user``), so all of this
works rootless. The VMM waits on a FIFO until the uplink and the rules are in place: the
guest never runs a moment without its policy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from smolvm.exceptions import NetworkError
from smolvm.network import egress
from smolvm.network.policy import host_addresses, resolv_conf, sandbox_rules
from smolvm.types import InternetSettings

#: The namespace's address on slirp4netns's network; forwards land here.
NS_ADDR = "10.0.2.100"
#: slirp4netns's DNS forwarder (to the host's resolver).
UPLINK_DNS = "10.0.2.3"
TOOLS = ("unshare", "nsenter", "slirp4netns", "nft", "mount")
#: Extra tools of named-domain policies (the namespace's resolver and SNI/Host proxy).
DOMAIN_TOOLS = ("dnsmasq", "sniproxy", "ip")
READY_TIMEOUT = 10.0
#: Runs inside the new namespaces: private resolv.conf, wait for "go", then the VMM.
_WRAPPER = (
    'f=$1; r=$2; shift 2; mount --bind "$r" /etc/resolv.conf || exit 97; '
    'read go < "$f" || exit 98; [ "$go" = go ] || exit 99; exec "$@"'
)


def missing_tools() -> list[str]:
    """The host tools sealed networking needs that are not installed."""
    return [t for t in TOOLS + DOMAIN_TOOLS if which(t) is None]


def which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if os.access(p := f"{d}/{tool}", os.X_OK)),
        None,
    )


def _tool(tool: str) -> str:
    path = which(tool)
    if path is None:
        raise NetworkError(
            f"{tool} not found: user-mode networking runs each VM in its own network namespace "
            "(needs unshare, nsenter, slirp4netns, nftables). Install them "
            "(apt-get install slirp4netns nftables util-linux mount, or scripts/setup.sh) "
            "or use network='none'"
        )
    return path


@dataclass
class NetSandbox:
    """What :func:`launch` needs (part of the VMM's launch spec)."""

    dir: Path
    api_socket: Path
    settings: InternetSettings
    #: Host ports on 127.0.0.1 forwarded into the namespace (same port number there).
    forwards: list[int] = field(default_factory=list)
    #: Called with the pid of each helper process as soon as it exists (the ledger).
    record_helper: Callable[[int], None] | None = None

    @property
    def fifo(self) -> Path:
        return self.dir / "netns.go"

    @property
    def resolv(self) -> Path:
        return self.dir / "resolv.conf"

    @property
    def dns(self) -> list[str]:
        """The resolvers the namespace's side uses (never the guest directly)."""
        return self.settings.dns_servers or [UPLINK_DNS]

    @property
    def guest_dns(self) -> list[str]:
        """What the VMM forwards the guest's DNS to: the upstream, or with named domains
        the namespace's own resolver (answers allowed names with the proxy, nothing else)."""
        return [egress.LOCAL_DNS] if self.settings.domains else self.dns


def rootless() -> bool:
    return os.geteuid() != 0


def tun_usable() -> bool:
    """This user can open /dev/net/tun (root always can)."""
    return os.geteuid() == 0 or os.access("/dev/net/tun", os.R_OK | os.W_OK)


def _ns_flags(pid: int) -> list[str]:
    user = ["--user", "--preserve-credentials"] if rootless() else []
    return [_tool("nsenter"), f"--target={pid}", "--net", *user, "--"]


def wrap(argv: list[str], sb: NetSandbox) -> list[str]:
    """``argv`` run in fresh network and mount namespaces, held until :func:`launch` says go."""
    user = ["--user", "--map-root-user"] if rootless() else []
    return [
        _tool("unshare"),
        "--net",
        "--mount",
        *user,
        "--",
        "/bin/sh",
        "-c",
        _WRAPPER,
        "smolvm-netns",
        str(sb.fifo),
        str(sb.resolv),
        *argv,
    ]


def launch(
    argv: list[str],
    sb: NetSandbox,
    *,
    stderr: IO[bytes],
    on_spawn: Callable[[int], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (the VMM) inside a sealed namespace, in a session of its own; returns
    its process once the namespace is ready and the VMM runs (the process *is* the VMM:
    ``unshare`` and the wrapper ``exec`` into it)."""
    for t in TOOLS + (DOMAIN_TOOLS if sb.settings.domains else ()):
        _tool(t)
    if rootless() and not tun_usable():
        raise NetworkError(
            "user-mode networking without root needs /dev/net/tun readable and writable by you "
            "(slirp4netns creates the sandbox's uplink with it): `sudo chmod 0666 /dev/net/tun` "
            "(the usual distribution default), run as root, or use network='none'"
        )
    sb.resolv.write_text(resolv_conf(sb.guest_dns))
    sb.fifo.unlink(missing_ok=True)
    os.mkfifo(sb.fifo, 0o600)
    sb.api_socket.unlink(missing_ok=True)
    exit_r, exit_w = os.pipe()
    ready_r, ready_w = os.pipe()
    wrapper: subprocess.Popen[bytes] | None = None
    uplink: subprocess.Popen[bytes] | None = None
    try:
        # The VMM inherits exit_w; when it exits, slirp4netns sees EOF and exits too.
        wrapper = subprocess.Popen(
            wrap(argv, sb),
            pass_fds=(exit_w,),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
            umask=0o077,  # whatever QEMU creates is ours alone
        )
        if on_spawn is not None:
            on_spawn(wrapper.pid)  # execs into the VMM: same pid, same start time
        _wait_unshared(wrapper)
        uplink = _start_uplink(wrapper.pid, sb, exit_r, ready_w)
        os.close(ready_w)
        ready_w = -1
        _wait_ready(ready_r, uplink, wrapper)
        apply_rules(wrapper.pid, sb)
        if sb.settings.domains:
            egress.start(_ns_flags(wrapper.pid), sb.dir, sb.settings, sb.dns, sb.record_helper, _tool)
        for port in sb.forwards:
            add_forward(sb.api_socket, port)
        _release(sb.fifo, wrapper)
        return wrapper
    except BaseException:
        for p in (wrapper, uplink):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        for fd in (exit_r, exit_w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        sb.fifo.unlink(missing_ok=True)


def _wait_unshared(wrapper: subprocess.Popen[bytes]) -> None:
    """Wait until the launcher has its own network namespace. Until ``unshare`` has run,
    /proc/PID/ns/net is still ours, and an uplink started then would configure the host's
    own network (a TAP and a default route on the host)."""
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if os.stat(f"/proc/{wrapper.pid}/ns/net").st_ino != own:
                return
        except FileNotFoundError:
            pass
        if wrapper.poll() is not None:
            raise NetworkError(f"unshare failed (exit {wrapper.returncode}); see the VM's qemu.log")
        if time.monotonic() > deadline:
            raise NetworkError(f"the VMM launcher got no network namespace within {READY_TIMEOUT} s")
        time.sleep(0.0005)


def _start_uplink(pid: int, sb: NetSandbox, exit_r: int, ready_w: int) -> subprocess.Popen[bytes]:
    argv = [
        _tool("slirp4netns"),
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        f"--api-socket={sb.api_socket}",
        f"--exit-fd={exit_r}",
        f"--ready-fd={ready_w}",
    ]
    if rootless():
        argv.append(f"--userns-path=/proc/{pid}/ns/user")
    argv += [str(pid), "tap0"]
    log = open(sb.dir / "slirp4netns.log", "ab")
    try:
        proc = subprocess.Popen(
            argv,
            pass_fds=(exit_r, ready_w),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    if sb.record_helper is not None:
        sb.record_helper(proc.pid)
    return proc


def _wait_ready(fd: int, uplink: subprocess.Popen[bytes], wrapper: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            if os.read(fd, 1):
                return
        except BlockingIOError:
            pass
        for name, p in (("slirp4netns", uplink), ("the VMM launcher", wrapper)):
            if p.poll() is not None:
                raise NetworkError(f"{name} exited ({p.returncode}) while the sandbox network came up")
        time.sleep(0.002)
    raise NetworkError(f"the sandbox network did not come up within {READY_TIMEOUT} s")


def apply_rules(pid: int, sb: NetSandbox) -> None:
    """Load the policy into the namespace of ``pid`` (atomically: one nft transaction)."""
    proxy = egress.PROXY_PORTS if sb.settings.domains else ()
    rules = sandbox_rules(
        sb.settings, dns=sb.dns, host_addrs=host_addresses(), proxy_ports=proxy, proxy_source=egress.SOURCE
    )
    proc = subprocess.run(
        [*_ns_flags(pid), _tool("nft"), "-j", "-f", "-"],
        input=json.dumps({"nftables": rules}),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise NetworkError(f"loading the sandbox's network policy failed: {proc.stderr.strip()[-800:]}")


def _release(fifo: Path, wrapper: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: the launcher has not opened it yet
            if wrapper.poll() is not None or time.monotonic() > deadline:
                raise NetworkError("the VMM launcher ended before its network was ready") from None
            time.sleep(0.001)
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- forwards
def _api(path: Path, request: dict[str, object]) -> dict[str, object]:
    """One request to slirp4netns's API socket (JSON in, JSON out, one per connection)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise NetworkError(f"{path} is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if len(data) > 1 << 20:
                    raise NetworkError("slirp4netns API answer over 1 MiB")
    except OSError as exc:
        raise NetworkError(f"slirp4netns API {path}: {exc}") from exc
    try:
        reply = json.loads(data or b"{}")
    except ValueError as exc:
        raise NetworkError(f"slirp4netns API {path}: bad answer {data[:200]!r}") from exc
    if not isinstance(reply, dict) or "error" in reply:
        raise NetworkError(f"slirp4netns API {request.get('execute')}: {reply!r}"[:500])
    return reply


def add_forward(api_socket: Path, port: int) -> None:
    """Host ``127.0.0.1:port`` → the namespace's ``port`` (where QEMU's hostfwd listens)."""
    _api(
        api_socket,
        {
            "execute": "add_hostfwd",
            "arguments": {
                "proto": "tcp",
                "host_addr": "127.0.0.1",
                "host_port": port,
                "guest_addr": NS_ADDR,
                "guest_port": port,
            },
        },
    )


def remove_forward(api_socket: Path, port: int) -> None:
    reply = _api(api_socket, {"execute": "list_hostfwd"})
    body = reply.get("return", reply)  # slirp4netns 1.2 answers {"entries": [...]}
    items = body.get("entries", []) if isinstance(body, dict) else []
    for e in items:
        if isinstance(e, dict) and e.get("host_port") == port and "id" in e:
            _api(api_socket, {"execute": "remove_hostfwd", "arguments": {"id": e["id"]}})
