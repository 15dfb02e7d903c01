"""What the sealed network costs: ``SmolVM()`` to first command, and a 1 MB HTTP fetch by
the guest, with and without the policy (root: it builds a fake internet in a namespace).

Variants, interleaved round by round so host drift hits all alike:

* ``unsealed``: QEMU's plain user-mode network, as before the sealed network (the launch
  spec's sandbox is dropped for this variant only — the product has no such switch);
* ``sealed``: the default policy (``["*"]``): own namespace, slirp4netns, nftables;
* ``domains``: ``allowed_domains=["bench.test"]``: plus dnsmasq and sniproxy in the path.

Traffic goes only to a namespace this script creates (198.51.100.0/24) and loopback.

    sudo .venv/bin/python benchmarks/network.py --rounds 7 --out benchmarks/results/network.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import summary

NS_ADDR, HOST_END = "198.51.100.20", "198.51.100.21"
BODY = b"x" * (1 << 20)
FETCH = (
    "import time, urllib.request as u\n"
    "ts = []\n"
    "for i in range({n}):\n"
    "    t = time.perf_counter(); d = u.urlopen('{url}', timeout=30).read()\n"
    "    ts.append(time.perf_counter() - t)\n"
    "    assert len(d) == {size}\n"
    "print(' '.join('%.6f' % x for x in ts))\n"
)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def fake_internet() -> Iterator[None]:
    tag = uuid.uuid4().hex[:6]
    ns, veth, peer = f"smvb-{tag}", f"smvbh{tag}", f"smvbn{tag}"
    server = subprocess.Popen(["true"])
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_END}/24", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NS_ADDR}/24", "dev", peer)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", HOST_END)
        code = (
            "import http.server\n"
            f"B = b'x' * {len(BODY)}\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.send_header('Content-Length', str(len(B)))\n"
            "        self.end_headers(); self.wfile.write(B)\n"
            "    def log_message(self, *a): pass\n"
            f"http.server.ThreadingHTTPServer(('{NS_ADDR}', 80), H).serve_forever()\n"
        )
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])
        dns = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--listen-address={NS_ADDR}", "--bind-interfaces", f"--address=/bench.test/{NS_ADDR}",
             "--user=root", "--pid-file="],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:  # the namespace's web server answers the host
            try:
                socket.create_connection((NS_ADDR, 80), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield
    finally:
        for p in (server, locals().get("dns")):
            if p is not None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def unsealed() -> Iterator[None]:
    """Launch specs without a sandbox (QEMU's own user-mode network on the host)."""
    from smolvm.runtime import spec

    orig = spec.NetSandbox
    spec.NetSandbox = lambda **kw: None  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        spec.NetSandbox = orig  # type: ignore[misc]


def one(variant: str, fetches: int) -> tuple[float, list[float]]:
    from smolvm import SmolVM, VMConfig

    settings: dict = {"dns_servers": [NS_ADDR]}
    url = f"http://{NS_ADDR}/"
    if variant == "domains":
        settings["allowed_domains"] = ["bench.test"]
        url = "http://bench.test/"
    ctx = unsealed() if variant == "unsealed" else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        with SmolVM(VMConfig(internet_settings=settings)) as vm:
            vm.run("true")
            start = time.perf_counter() - t0
            r = vm.run(f'python3 -c "{FETCH.format(n=fetches, url=url, size=len(BODY))}"', timeout=300)
            assert r.ok, r
            return start, [float(x) for x in r.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--fetches", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    variants = ("unsealed", "sealed", "domains")
    starts: dict[str, list[float]] = {v: [] for v in variants}
    fetch: dict[str, list[float]] = {v: [] for v in variants}
    with fake_internet():
        one("sealed", 1)  # warm-up: image snapshot, caches
        for _ in range(args.rounds):
            for v in variants:
                s, f = one(v, args.fetches)
                starts[v].append(s)
                fetch[v].extend(f)
    res = {
        "benchmark": "network",
        "date": time.strftime("%Y-%m-%d"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "definitions": {
            "start_ms": "SmolVM() entered (restore of the boot snapshot) + run('true'), wall clock",
            "fetch_1mb_ms": "one 1 MiB HTTP GET timed inside the guest (python3 urllib), "
            f"{args.fetches} per sandbox",
        },
        "start_ms": {v: summary(starts[v], 1000, 1) for v in variants},
        "fetch_1mb_ms": {v: summary(fetch[v], 1000, 2) for v in variants},
    }
    base_s = res["start_ms"]["unsealed"]["median"]
    base_f = res["fetch_1mb_ms"]["unsealed"]["median"]
    res["added_ms_vs_unsealed"] = {
        v: {
            "start": round(res["start_ms"][v]["median"] - base_s, 1),
            "fetch_1mb": round(res["fetch_1mb_ms"][v]["median"] - base_f, 2),
        }
        for v in variants[1:]
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
