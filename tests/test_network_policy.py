"""The sealed network on real guests, in user and TAP mode (root: namespaces, nftables).

Traffic goes only to loopback and to a network namespace this module creates (a veth pair
with addresses in 198.51.100.0/24, standing in for the internet, with HTTP, HTTPS and DNS
servers inside), plus addresses this module adds to the host end of the veth (the
"host address on another interface" and a stand-in for the cloud metadata address). Every
probe has a control: the same target answers the host, or answers the guest once a policy
allows it, so a probe that fails for an unrelated reason cannot pass as "blocked".
"""

from __future__ import annotations

import datetime
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import VMTracker, qemu_pids_for
from smolvm import procs

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.requires("root", "host-packages")]

NS_ADDR = "198.51.100.10"
HOST_END = "198.51.100.1"
OTHER_HOST_ADDR = "203.0.113.77"  # on the host end of the veth: the host itself
METADATA = "169.254.169.254"
PAGE = "fake-internet"

PROBE = r"""
import json, socket, ssl, sys, urllib.request
out = {}
for kind, target in json.loads(sys.argv[1]):
    try:
        if kind == "tcp":
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=4).close()
            out[target] = "open"
        elif kind == "http":
            out[target] = urllib.request.urlopen(target, timeout=8).read().decode()[:64]
        elif kind == "https":
            ctx = ssl._create_unverified_context()
            out[target] = urllib.request.urlopen(target, timeout=8, context=ctx).read().decode()[:64]
        elif kind == "dns":
            out[target] = socket.gethostbyname(target)
    except Exception as e:
        out[target] = "error: " + type(e).__name__ + " " + str(e)[:80]
print(json.dumps(out))
"""


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check)


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{PAGE} {self.headers.get('Host', '')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _answers(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((addr, port)) == 0


def serve(addr: str, port: int) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer((addr, port), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("allowed.test"), x509.DNSName("other.test")]), False
        )
        .sign(key, hashes.SHA256())
    )
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return c, k


SERVER = r"""
import http.server, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("fake-internet " + self.headers.get("Host", "")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
addr, cert, key = sys.argv[1:4]
plain = http.server.ThreadingHTTPServer((addr, 80), H)
tls = http.server.ThreadingHTTPServer((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
"""


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A fake internet: a namespace behind a veth, HTTP(S) on 198.51.100.10, dnsmasq
    answering allowed.test and other.test with that address; on the host end of the veth
    a host address and a metadata stand-in; and a loopback-only server on the host."""
    tmp = tmp_path_factory.mktemp("internet")
    tag = uuid.uuid4().hex[:6]
    ns, veth, peer = f"smvt-{tag}", f"smvh{tag}", f"smvn{tag}"
    procs: list[subprocess.Popen[str]] = []
    servers: list[http.server.ThreadingHTTPServer] = []
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_END}/24", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "addr", "add", f"{NS_ADDR}/24", "dev", peer, ns=ns)
        sh("ip", "link", "set", peer, "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", HOST_END, ns=ns)
        cert, key = self_signed(tmp)
        web = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, NS_ADDR, str(cert), str(key)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(web)
        assert web.stdout is not None and web.stdout.readline().strip() == "ready"
        dns = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--no-resolv",
                "--no-hosts", f"--listen-address={NS_ADDR}", "--bind-interfaces", "--port=53",
                f"--address=/allowed.test/{NS_ADDR}", f"--address=/other.test/{NS_ADDR}",
                f"--pid-file={tmp / 'dnsmasq.pid'}", "--user=root",
            ],
            text=True,
        )  # fmt: skip
        procs.append(dns)
        # Host addresses on an interface of their own (the host end of the veth).
        sh("ip", "addr", "add", f"{OTHER_HOST_ADDR}/32", "dev", veth)
        sh("ip", "addr", "add", f"{METADATA}/32", "dev", veth)
        servers += [serve(OTHER_HOST_ADDR, 8081), serve(METADATA, 80), serve("127.0.0.1", 0)]
        loop_port = servers[-1].server_address[1]
        deadline = time.monotonic() + 10
        while not _answers(NS_ADDR, 53):
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)
        # Controls: every target answers the host, so a guest that cannot reach one is blocked.
        for url in (f"http://{NS_ADDR}/", f"http://{OTHER_HOST_ADDR}:8081/", f"http://{METADATA}/",
                    f"http://127.0.0.1:{loop_port}/"):  # fmt: skip
            assert urllib.request.urlopen(url, timeout=5).read().startswith(PAGE.encode())
        yield {"ns": ns, "loop_port": loop_port}
    finally:
        for s in servers:
            s.shutdown()
        for p in procs:
            p.kill()
            p.wait()
        sh("ip", "link", "del", veth, check=False)
        sh("ip", "netns", "del", ns, check=False)
    assert ns not in sh("ip", "netns", "list").stdout


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory, default_image) -> Iterator[VMTracker]:
    t = VMTracker(tmp_path_factory.mktemp("policy"))
    yield t
    assert not t.cleanup()


def probe(vm, *targets: tuple[str, str]) -> dict[str, str]:
    if vm.run("test -f /tmp/probe.py && echo y", shell="raw").output != "y":
        vm.run(f"cat > /tmp/probe.py <<'EOF'\n{PROBE}\nEOF", shell="raw")
    arg = json.dumps(list(targets)).replace("'", "'\\''")
    r = vm.run(f"python3 /tmp/probe.py '{arg}'", shell="raw", timeout=120)
    assert r.ok, r
    return json.loads(r.stdout)


def host_targets(vm, internet, other_vm) -> list[tuple[str, str]]:
    gw = vm.info.network.gateway_ip
    return [
        ("http", f"http://{gw}:{internet['loop_port']}/"),  # host loopback through the gateway
        ("http", f"http://{OTHER_HOST_ADDR}:8081/"),  # a host address on another interface
        ("tcp", f"{gw}:{other_vm.info.network.ssh_host_port}"),  # another sandbox's forward
        ("http", f"http://{METADATA}/"),  # cloud metadata
    ]


@pytest.fixture(scope="module", params=["user", "tap"])
def pair(request, tracker, internet):
    """Per network mode: the default policy (with the fake internet's DNS) and a neighbour."""
    mode = request.param
    dns = {"dns_servers": [NS_ADDR]}
    from smolvm import VMConfig

    a = tracker.sandbox(VMConfig(network=mode, internet_settings=dns)).start()
    b = tracker.sandbox(VMConfig(network=mode, internet_settings=dns)).start()
    yield {"mode": mode, "a": a, "b": b}
    for vm in (a, b):
        vm.delete()


def test_the_host_and_private_ranges_are_unreachable(pair, internet):
    a, b = pair["a"], pair["b"]
    targets = host_targets(a, internet, b)
    got = probe(a, *targets)
    for _, t in targets:
        # Refused at once (a reset, or an ICMP error the user-mode stack reports as an
        # unreachable network), never a timeout.
        assert "refused" in got[t] or "unreachable" in got[t], f"{pair['mode']}: {t} not refused: {got[t]}"
    # Control: the public stand-in answers the same guest, by address and by name.
    got = probe(a, ("http", f"http://{NS_ADDR}/"), ("http", "http://allowed.test/"), ("dns", "other.test"))
    assert got[f"http://{NS_ADDR}/"].startswith(PAGE)
    assert got["http://allowed.test/"] == f"{PAGE} allowed.test"
    assert got["other.test"] == NS_ADDR


def test_allowed_cidrs_open_a_denied_range(tracker, internet):
    from smolvm import VMConfig

    for mode in ("user", "tap"):
        vm = tracker.sandbox(
            VMConfig(network=mode, internet_settings={"allowed_cidrs": [f"{OTHER_HOST_ADDR}/32"]})
        ).start()
        try:
            got = probe(vm, ("http", f"http://{OTHER_HOST_ADDR}:8081/"), ("http", f"http://{METADATA}/"))
            # allowed_cidrs wins over the host-address rule (the probe can succeed) ...
            assert got[f"http://{OTHER_HOST_ADDR}:8081/"].startswith(PAGE), (mode, got)
            # ... and opens only what it names.
            assert got[f"http://{METADATA}/"].startswith("error"), (mode, got)
        finally:
            vm.delete()


def test_no_internet_means_nothing_leaves(tracker, internet):
    from smolvm import VMConfig

    for mode in ("user", "tap"):
        vm = tracker.sandbox(
            VMConfig(network=mode, internet_settings={"allowed_domains": [], "dns_servers": [NS_ADDR]})
        ).start()
        try:
            got = probe(
                vm, ("http", f"http://{NS_ADDR}/"), ("tcp", f"{NS_ADDR}:443"), ("dns", "allowed.test")
            )
            assert all(v.startswith("error") for v in got.values()), (mode, got)
            assert vm.info.config.internet_settings.allowed_domains == []
        finally:
            vm.delete()


def wait_http(tracker, vm, port: int, path: str = "/") -> bytes:
    """GET ``127.0.0.1:port`` until the guest's server answers (60 s), with a diagnosis."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
        except OSError as exc:
            if time.monotonic() > deadline:
                rec = tracker.manager.state.get_vm(vm.vm_id)
                guest = vm.run("cat /proc/net/tcp", shell="raw").output
                inner = sh(
                    "nsenter", "-t", str(rec.pid), "-n", "sh", "-c", "ip -br addr; ss -tan", check=False
                )
                host = sh("ss", "-tanp", check=False).stdout
                raise AssertionError(
                    f"guest server never answered: {exc}\n{guest}\n{inner.stdout}\n{host}\n{rec.network}"
                ) from exc
            time.sleep(0.2)


def test_expose_local_serves_a_guest_port_and_delete_leaves_nothing(tracker):
    from smolvm import VMConfig

    for mode in ("user", "tap"):
        vm = tracker.sandbox(VMConfig(network=mode)).start()
        vm.spawn(
            "mkdir -p /srv && cd /srv && echo guest-page > index.html && python3 -m http.server 8000",
            detach=True,
        )
        port = vm.expose_local(8000)
        assert vm.exposed_ports() == {port: 8000}
        assert wait_http(tracker, vm, port, "/index.html") == b"guest-page\n"
        # Only on loopback: slirp4netns (user mode) or socat (TAP mode) on 127.0.0.1 alone.
        listeners = sh("ss", "-Hltnp", f"sport = :{port}").stdout
        local = [w for w in listeners.split() if w.endswith(f":{port}")]
        assert local == [f"127.0.0.1:{port}"], listeners
        assert ("slirp4netns" if mode == "user" else "socat") in listeners
        vm.unexpose_local(port)
        assert vm.exposed_ports() == {}
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=3).read()
        port2 = vm.expose_local(8000, port)  # the same port again, survives stop/start
        vm.stop()
        vm.start()
        vm.spawn("cd /srv && python3 -m http.server 8000", detach=True)
        assert wait_http(tracker, vm, port2, "/index.html") == b"guest-page\n"
        vm_id, info = vm.vm_id, vm.info
        helpers = [r["value"] for r in tracker.manager.state.resources(vm_id, "helper")]
        names = sorted(procs.command_name(int(t.split(":")[0])) or "?" for t in helpers)
        vm.delete()
        assert not qemu_pids_for(vm_id)
        # The console writer, and the uplink; or relays for SSH and 8000.
        assert names == (["multilog", "slirp4netns"] if mode == "user" else ["multilog", "socat", "socat"])
        for token in helpers:  # the uplink is gone with its VM
            assert not procs.is_alive(int(token.split(":")[0]), token)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port2)) != 0
        assert not list(tracker.manager.socket_dir.glob(f"smolvm-{vm_id}.*"))
        if mode == "tap":
            rules = sh("nft", "-j", "list", "ruleset").stdout
            assert vm_id not in rules and info.network.tap_device not in sh("ip", "link").stdout
        assert not tracker.manager.state.resources(vm_id)


def test_bad_settings_are_typed_errors():
    from smolvm import InternetSettings
    from smolvm.exceptions import ValidationError

    for bad in (
        {"allowed_domains": ["*", "pypi.org"]},
        {"allowed_domains": ["not a name"]},
        {"allowed_cidrs": ["10.0.0.0/33"]},
        {"dns_servers": ["resolver.example"]},
    ):
        with pytest.raises(ValidationError):
            InternetSettings(**bad)
    assert InternetSettings(allowed_domains=["PyPI.org."]).allowed_domains == ["pypi.org"]


def test_named_domains_only_those_names_over_http_and_https(tracker, internet):
    from smolvm import VMConfig

    settings = {"allowed_domains": ["allowed.test"], "dns_servers": [NS_ADDR]}
    vm = tracker.sandbox(VMConfig(internet_settings=settings)).start()
    try:
        got = probe(
            vm,
            ("http", "http://allowed.test/"),
            ("https", "https://allowed.test/"),
            ("dns", "other.test"),  # the guest cannot even resolve another name
            ("http", f"http://{NS_ADDR}/"),  # the bare address of an allowed name
            ("tcp", f"{NS_ADDR}:443"),
            ("http", f"http://{METADATA}/"),
        )
        assert got["http://allowed.test/"] == f"{PAGE} allowed.test", got
        assert got["https://allowed.test/"] == f"{PAGE} allowed.test", got
        for t in ("other.test", f"http://{NS_ADDR}/", f"{NS_ADDR}:443", f"http://{METADATA}/"):
            assert got[t].startswith("error"), (t, got)
        # Another name on the allowed address, asked for through the proxy itself: the
        # proxy reads the Host header / SNI and refuses it.
        gw = vm.info.network.gateway_ip
        other_host = (
            f"import http.client as h; c=h.HTTPConnection('{gw}', 80, timeout=8); "
            "c.request('GET', '/', headers={'Host': 'other.test'}); print(c.getresponse().read())"
        )
        r = vm.run(f'python3 -c "{other_host}"', shell="raw", timeout=60)
        assert PAGE not in r.stdout and "Backend not available" in r.stdout, r  # sniproxy's 503
        sni = (
            "import socket,ssl; c=ssl._create_unverified_context(); "
            f"s=c.wrap_socket(socket.create_connection(('{gw}', 443), timeout=8), "
            "server_hostname='other.test'); "
            "s.send(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))"
        )
        r = vm.run(f'python3 -c "{sni}"', shell="raw", timeout=60)
        # sniproxy answers an unlisted SNI with a TLS handshake-failure alert.
        assert not r.ok and PAGE not in r.stdout and "HANDSHAKE_FAILURE" in r.stderr, r
        helpers = tracker.manager.state.resources(vm.vm_id, "helper")
        names = sorted(procs.command_name(int(r["value"].split(":")[0])) or "?" for r in helpers)
        assert names == ["dnsmasq", "multilog", "slirp4netns", "sniproxy"], names  # console too
    finally:
        vm.delete()
    for r in helpers:
        assert not procs.is_alive(int(r["value"].split(":")[0]), r["value"])


def test_named_domains_need_user_mode(tracker):
    from smolvm import VMConfig
    from smolvm.exceptions import ValidationError

    with pytest.raises(ValidationError, match="network='user'"):
        tracker.sandbox(VMConfig(network="tap", internet_settings={"allowed_domains": ["pypi.org"]})).start()


def test_snapshot_clones_keep_the_policy(tracker, internet):
    from smolvm import SmolVM, VMConfig

    vm = tracker.sandbox(
        VMConfig(internet_settings={"allowed_domains": [], "dns_servers": [NS_ADDR]})
    ).start()
    snap = vm.snapshot()
    vm.delete()
    clone = SmolVM.from_snapshot(snap.snapshot_id, data_dir=tracker.data_dir)
    tracker.track(clone.vm_id)
    with clone:
        assert clone.info.config.internet_settings.allowed_domains == []
        got = probe(clone, ("http", f"http://{NS_ADDR}/"))
        assert got[f"http://{NS_ADDR}/"].startswith("error"), got
    # An explicit policy replaces the snapshot's.
    opened = SmolVM.from_snapshot(
        snap.snapshot_id, data_dir=tracker.data_dir, internet_settings={"dns_servers": [NS_ADDR]}
    )
    tracker.track(opened.vm_id)
    with opened:
        assert probe(opened, ("http", f"http://{NS_ADDR}/"))[f"http://{NS_ADDR}/"].startswith(PAGE)
    tracker.manager.delete_snapshot(snap.snapshot_id)
