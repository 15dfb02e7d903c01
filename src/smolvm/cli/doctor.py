"""``smolvm doctor``: every host prerequisite with pass/warn/fail and a concrete fix.

A *fail* blocks use (exit 1): no QEMU, an unwritable data dir, a corrupt state database,
no way to get an image. A *warn* degrades something (no fast KVM → TCG, no TAP) but
does not fail the command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import emit_json, err, out

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
CAP_NET_ADMIN = 12


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


def version_line(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else None


def has_cap_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_qemu() -> list[Check]:
    from smolvm.backends.qemu import QEMU_BIN, VMM_USER_DEFAULT, qemu_binary, vmm_user

    fix = "apt-get install qemu-system-x86 qemu-utils   (or: smolvm setup)"
    binary = qemu_binary()
    checks = []
    if binary:
        ver = version_line([binary, "--version"]) or "version unknown"
        checks.append(Check("qemu", OK, f"{binary}: {ver}"))
    else:
        checks.append(Check("qemu", FAIL, f"{QEMU_BIN} not found on PATH", fix))
    img = shutil.which("qemu-img")
    checks.append(Check("qemu-img", OK, img) if img else Check("qemu-img", FAIL, "qemu-img not found", fix))
    if os.geteuid() == 0:
        user = vmm_user()
        checks.append(
            Check("vmm-user", OK, f"QEMU drops to user {user} after start")
            if user
            else Check(
                "vmm-user",
                WARN,
                "QEMU runs as root: no unprivileged user to drop to",
                f"useradd --system --no-create-home --shell /usr/sbin/nologin {VMM_USER_DEFAULT}"
                "   (or: bash scripts/setup.sh)",
            )
        )
    return checks


def check_kvm(cache_dir: Path | None, reprobe: bool) -> tuple[Check, dict[str, Any]]:
    from smolvm.host.kvm import probe_kvm, probe_kvm_cached

    probe = probe_kvm_cached(cache_dir, refresh=reprobe) if cache_dir else probe_kvm()
    d = probe.to_dict()
    d["accel"] = probe.accel
    d["emulated"] = bool(probe.present and not probe.usable and not probe.forced)
    if probe.usable:
        return Check("kvm", OK, f"fast KVM: {probe.reason}"), d
    if not probe.present:
        return Check(
            "kvm",
            WARN,
            f"no KVM, guests run under TCG (slower): {probe.reason}",
            "bare metal: enable VT-x/AMD-V and load kvm_intel/kvm_amd; cloud: use an "
            "instance type with nested virtualization",
        ), d
    if probe.forced:
        return Check("kvm", WARN, probe.reason, "unset SMOLVM_ACCEL to let the probe decide"), d
    return Check(
        "kvm",
        WARN,
        f"/dev/kvm present but not usable, TCG will be used: {probe.reason}",
        "nothing to do (TCG works); for speed run on hardware with VT-x/AMD-V exposed to this machine",
    ), d


def check_tsc() -> Check:
    from smolvm.host.tsc import host_tsc_khz

    khz = host_tsc_khz()
    if khz:
        return Check("tsc", OK, f"host TSC {khz / 1000:.3f} MHz (passed to guests as tsc_early_khz={khz})")
    return Check(
        "tsc",
        WARN,
        "host TSC rate not found (sysfs, dmesg, /proc/cpuinfo): microvm guests "
        "may hang while calibrating under TCG",
        "make `dmesg` readable (sysctl kernel.dmesg_restrict=0) or check /proc/cpuinfo",
    )


def check_sealed_network() -> list[Check]:
    """User mode (the default) runs each VM in its own namespace; say what that needs and
    what each mode isolates."""
    from smolvm.network.sandbox import missing_tools, tun_usable

    missing = missing_tools() + ([] if tun_usable() else ["access to /dev/net/tun"])
    core = [t for t in missing if t not in ("dnsmasq", "sniproxy", "ip")]
    checks = [
        Check(
            "sealed network",
            FAIL if core else (WARN if missing else OK),
            (
                f"missing {', '.join(missing)}: "
                + ("user-mode VMs cannot start" if core else "named allowed_domains cannot start")
            )
            if missing
            else "user mode: each VM in its own namespace (slirp4netns uplink, nftables policy)",
            "apt-get install slirp4netns nftables dnsmasq-base sniproxy (or `smolvm setup`)"
            if missing
            else None,
        ),
        Check(
            "isolation",
            INFO,
            "user and TAP mode: a guest never reaches the host, other sandboxes, link-local "
            "(metadata) or private ranges unless allowed_cidrs names them; allowed_domains "
            "limits the rest (names over HTTP/HTTPS need user mode); none: no NIC at all",
        ),
    ]
    return checks


def check_network() -> list[Check]:
    checks = check_sealed_network()
    tun = Path("/dev/net/tun")
    cap = has_cap_net_admin()
    if tun.exists() and cap:
        checks.append(Check("tap", OK, "/dev/net/tun present and CAP_NET_ADMIN held (network='tap' works)"))
    elif not tun.exists():
        checks.append(
            Check(
                "tap",
                WARN,
                "/dev/net/tun missing: only user-mode networking",
                "modprobe tun (network='user', the default, needs nothing)",
            )
        )
    else:
        checks.append(
            Check(
                "tap",
                WARN,
                "not root and no CAP_NET_ADMIN: only user-mode networking",
                "run as root for network='tap' (network='user', the default, needs nothing)",
            )
        )
    if not shutil.which("multilog"):
        checks.append(
            Check(
                "console",
                FAIL,
                "multilog not found: VMs cannot start (it writes their capped serial console)",
                "apt-get install daemontools",
            )
        )
    if not shutil.which("socat"):
        checks.append(
            Check(
                "socat", WARN, "socat not found: TAP-mode port forwards cannot start", "apt-get install socat"
            )
        )
    nft = shutil.which("nft")
    checks.append(
        Check("nft", OK, nft)
        if nft
        else Check(
            "nft",
            WARN,
            "nft not found: TAP networking cannot NAT or isolate guests",
            "apt-get install nftables",
        )
    )
    ssh = shutil.which("ssh")
    checks.append(
        Check("ssh", OK, ssh)
        if ssh
        else Check(
            "ssh",
            WARN,
            "ssh client not found: `smolvm ssh` and the SSH channel are unavailable",
            "apt-get install openssh-client",
        )
    )
    return checks


def check_image_tools(image_ready: bool) -> list[Check]:
    """Tools needed to *build* images: a fail only when no image is built yet."""
    bad = WARN if image_ready else FAIL
    why = " (only needed to rebuild images)" if image_ready else " (needed to build the first image)"
    checks = []
    for name, tool, pkg in (
        ("musl-gcc", "musl-gcc", "musl-tools gcc"),
        ("debootstrap", "debootstrap", "debootstrap"),
    ):
        p = shutil.which(tool)
        checks.append(
            Check(name, OK, p) if p else Check(name, bad, f"{tool} not found{why}", f"apt-get install {pkg}")
        )
    missing = [
        t
        for t in ("apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe", "mkfs.ext4")
        if not shutil.which(t)
    ]
    if missing:
        checks.append(
            Check(
                "build-tools",
                bad,
                f"missing: {', '.join(missing)}{why}",
                "apt-get install kmod e2fsprogs (on a Debian/Ubuntu host)",
            )
        )
    else:
        checks.append(Check("build-tools", OK, "apt-get, dpkg-deb, depmod, modprobe, mkfs.ext4"))
    if not image_ready and os.geteuid() != 0:
        checks.append(
            Check(
                "build-root", FAIL, "building the image needs root (debootstrap chroots)", "sudo smolvm setup"
            )
        )
    return checks


def check_data_dir() -> tuple[list[Check], Path | None]:
    from smolvm.exceptions import SmolVMError

    try:
        d = common.data_dir()
    except SmolVMError as exc:
        return [
            Check("data-dir", FAIL, str(exc), "set SMOLVM_DATA_DIR (or --data-dir) to a writable directory")
        ], None
    checks = [Check("data-dir", OK, f"{d} (writable)")]
    usage = shutil.disk_usage(d)
    free = usage.free
    detail = f"{common.fmt_bytes(free)} free in {d}"
    if free < 256 * 1024**2:
        checks.append(Check("disk-space", FAIL, detail, "free space or point --data-dir elsewhere"))
    elif free < 2 * 1024**3:
        checks.append(
            Check(
                "disk-space",
                WARN,
                detail + " (an image build needs ~1 GiB, each VM grows as it writes)",
                "free space or point --data-dir elsewhere",
            )
        )
    else:
        checks.append(Check("disk-space", OK, detail))
    return checks, d


def check_image() -> tuple[Check, bool]:
    from smolvm.images.builder import DEFAULT_IMAGE, ImageBuilder

    try:
        builder = ImageBuilder(common.image_dir())
        art = builder.get(DEFAULT_IMAGE)
    except Exception as exc:
        return Check("image", FAIL, f"cannot read the image cache: {exc}", "check SMOLVM_IMAGE_DIR"), False
    if art is None:
        return Check(
            "image",
            WARN,
            f"default image not built yet in {builder.cache_dir} (first VM creation builds it, ~1 min)",
            "smolvm image build   (or: smolvm setup)",
        ), False
    kver = (art.manifest.get("kernel") or {}).get("version", "?")
    agent = "agent+ssh" if art.has_agent else "ssh only"
    if not builder.is_current(DEFAULT_IMAGE):
        return Check(
            "image",
            WARN,
            f"default image at {art.path} is stale (guest sources changed); it is rebuilt on next use",
            "smolvm image build",
        ), True
    return Check("image", OK, f"default image {art.path} (kernel {kver}, {agent})"), True


def check_state(d: Path | None) -> list[Check]:
    if d is None:
        return []
    from smolvm.state.store import SCHEMA_VERSION, StateStore

    path = d / "state.db"
    try:
        store = StateStore(path)
        try:
            integrity = store.integrity_check()
            version = store.schema_version()
            vms = store.list_vms()
            tokens = {r["vm_id"]: r["value"] for r in store.resources(kind="process")}
        finally:
            store.close()
    except Exception as exc:
        full = "is full" in str(exc)
        return [
            Check(
                "state-db",
                FAIL,
                f"{path}: {exc}",
                f"free space in {path.parent}; the database itself is not damaged by this"
                if full
                else f"move the file away (mv {path} {path}.broken) and run `smolvm reconcile`; "
                "running VMs in it are lost",
            )
        ]
    if integrity != "ok":
        return [
            Check(
                "state-db",
                FAIL,
                f"{path}: integrity check failed: {integrity}",
                f"mv {path} {path}.broken (VMs recorded in it are lost)",
            )
        ]
    if version != SCHEMA_VERSION:
        return [
            Check(
                "state-db", FAIL, f"{path}: schema v{version}, expected v{SCHEMA_VERSION}", "upgrade smolvm"
            )
        ]
    checks = [Check("state-db", OK, f"{path}: integrity ok, schema v{version}")]
    from smolvm import procs
    from smolvm.types import VMState

    running = [r for r in vms if r.status in (VMState.RUNNING, VMState.PAUSED)]
    dead = [r.vm_id for r in running if not procs.is_alive(r.pid, tokens.get(r.vm_id))]
    summary = f"{len(vms)} VM(s), {len(running)} running"
    if dead:
        checks.append(
            Check(
                "vms", WARN, f"{summary}; VMM gone for {', '.join(dead)}", "smolvm reconcile && smolvm prune"
            )
        )
    else:
        checks.append(Check("vms", INFO, summary))
    return checks


def check_backend() -> Check:
    from smolvm.backends import resolve_backend

    try:
        name = resolve_backend(common.OPTS.backend)
    except Exception as exc:
        return Check("backend", FAIL, str(exc), "--backend qemu")
    fc = shutil.which(os.environ.get("SMOLVM_FIRECRACKER_BIN", "firecracker"))
    extra = "" if fc else " (firecracker not installed)"
    return Check("backend", OK if name else FAIL, f"{name}{extra}")


def run_checks(reprobe: bool = False) -> dict[str, Any]:
    from smolvm import __version__

    checks: list[Check] = [Check("smolvm", INFO, f"version {__version__}")]
    checks += check_qemu()
    dd_checks, d = check_data_dir()
    kvm_check, kvm = check_kvm(d / "cache" if d else None, reprobe)
    checks.append(kvm_check)
    checks.append(check_tsc())
    checks.append(check_backend())
    checks += check_network()
    image_check, image_ready = check_image()
    checks += check_image_tools(image_ready)
    checks += dd_checks
    checks.append(image_check)
    checks += check_state(d)
    ok = not any(c.status == FAIL for c in checks)
    return {
        "ok": ok,
        "accel": kvm["accel"],
        "kvm": kvm,
        "data_dir": str(d) if d else None,
        "checks": [asdict(c) for c in checks],
    }


_MARK = {OK: "[green]  ok[/]", WARN: "[yellow]warn[/]", FAIL: "[bold red]FAIL[/]", INFO: "[blue]info[/]"}


def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    reprobe: Annotated[
        bool, typer.Option("--reprobe", help="Measure KVM again instead of using this boot's cached probe.")
    ] = False,
) -> None:
    """Check the host: QEMU, KVM speed, TSC, networking, build tools, disk, image, state DB."""
    report = run_checks(reprobe)
    if json_out:
        emit_json(report)
    else:
        for c in report["checks"]:
            out.print(f"{_MARK[c['status']]}  [bold]{c['name']:<12}[/] {common.esc(c['detail'])}")
            if c["fix"] and c["status"] in (WARN, FAIL):
                out.print(f"      {'':<12} [dim]fix:[/] {common.esc(c['fix'])}")
        fails = sum(c["status"] == FAIL for c in report["checks"])
        warns = sum(c["status"] == WARN for c in report["checks"])
        verdict = "[green]ready[/]" if report["ok"] else "[bold red]not ready[/]"
        err.print(
            f"\n{verdict}: {fails} failure(s), {warns} warning(s); guests will use [bold]{report['accel']}[/]"
        )
    if not report["ok"]:
        raise typer.Exit(1)
