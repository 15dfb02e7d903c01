"""``smolvm setup``: install missing host packages (apt-get) and build the default image.

``HOST_PACKAGES`` is the single list of Debian/Ubuntu packages SmolVM needs on the host.
``scripts/setup-host.sh`` reads it with any Python 3, before a virtualenv exists:
``python3 src/smolvm/cli/setup.py --print-packages`` (one package per line); with the
package installed, ``python -m smolvm.cli.setup --print-packages`` works too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Annotated

try:
    import typer

    from smolvm.cli import common
    from smolvm.cli.common import CLIError, err
except ImportError:  # run as a plain script (setup-host.sh, no dependencies installed yet)
    if __name__ != "__main__":
        raise

#: Debian/Ubuntu packages needed on the host, and why.
HOST_PACKAGES_WHY: dict[str, str] = {
    "qemu-system-x86": "the hypervisor (qemu-system-x86_64, -M microvm)",
    "qemu-utils": "qemu-img: per-VM qcow2 overlays",
    "openssh-client": "ssh: `smolvm ssh` and the SSH command channel",
    "musl-tools": "musl-gcc: builds the static guest agent",
    "gcc": "the compiler musl-gcc wraps",
    "debootstrap": "builds the Debian root filesystem",
    "e2fsprogs": "mkfs.ext4 -d: the root filesystem image",
    "kmod": "depmod/modprobe: resolves the guest kernel's module dependencies",
    "nftables": "NAT and isolation for TAP networking",
    "iproute2": "ip tuntap: TAP devices",
    "ca-certificates": "HTTPS mirrors",
    "slirp4netns": "uplink of each user-mode VM's own network namespace (the sealed network)",
    "dnsmasq-base": "the resolver of a sandbox with named allowed_domains",
    "sniproxy": "the Host/SNI-checking proxy of a sandbox with named allowed_domains",
    "socat": "TAP-mode port forwards on 127.0.0.1",
    "daemontools": "multilog: each VM's serial console as capped, rotated files",
}
HOST_PACKAGES: list[str] = list(HOST_PACKAGES_WHY)


def missing_packages(packages: list[str] | None = None) -> list[str]:
    """The packages of ``packages`` (default HOST_PACKAGES) that dpkg does not report installed."""
    pkgs = list(packages or HOST_PACKAGES)
    if not shutil.which("dpkg-query"):
        raise CLIError(
            "dpkg-query not found: `smolvm setup` installs packages on Debian/Ubuntu only",
            f"install these with your package manager: {' '.join(pkgs)}; then `smolvm setup --no-apt`",
        )
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *pkgs], capture_output=True, text=True
    )
    installed = {line.split()[0] for line in proc.stdout.splitlines() if line.strip().endswith(" installed")}
    return [p for p in pkgs if p not in installed]


def _apt(argv: list[str]) -> None:
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise CLIError("installing packages needs root", "rerun as root: sudo smolvm setup")
        prefix = ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    err.print(f"[dim]$ {common.esc(' '.join(prefix + argv))}[/]")
    proc = subprocess.run(prefix + argv, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise CLIError(
            f"`{' '.join(argv[:2])}` failed (exit {proc.returncode})",
            "see apt's output above; fix the package sources and rerun `smolvm setup`",
        )


def install_packages(missing: list[str]) -> None:
    _apt(["apt-get", "update", "-q"])
    _apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing])
    if "sniproxy" in missing and shutil.which("systemctl"):
        # SmolVM runs sniproxy inside each sandbox's namespace; the package's host-wide
        # service (ports 80/443 on every interface) must not run.
        prefix = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(
            [*prefix, "systemctl", "disable", "--now", "sniproxy"], stdin=subprocess.DEVNULL, check=False
        )


def setup(
    no_apt: Annotated[bool, typer.Option("--no-apt", help="Do not install host packages.")] = False,
    no_image: Annotated[bool, typer.Option("--no-image", help="Do not build the default image.")] = False,
    force_image: Annotated[
        bool, typer.Option("--rebuild-image", help="Rebuild the default image even if current.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be done.")] = False,
) -> None:
    """Prepare this host: install missing packages and build the default image.

    Packages are installed with apt-get only when missing; the image is built only when
    missing or stale. Safe to run again."""
    missing = missing_packages()
    if not missing:
        err.print(f"[green]host packages:[/] all {len(HOST_PACKAGES)} installed")
    elif no_apt or dry_run:
        verb = "would install" if dry_run else "missing (skipped: --no-apt)"
        err.print(f"[yellow]host packages {verb}:[/] {' '.join(missing)}")
    else:
        err.print(f"installing {len(missing)} package(s): {' '.join(missing)}")
        install_packages(missing)
        still = missing_packages()
        if still:
            raise CLIError(f"still missing after apt-get install: {' '.join(still)}")
        err.print("[green]host packages installed[/]")

    from smolvm.host.accel import accel_decision

    probe = accel_decision(common.data_dir() / "cache")
    err.print(f"accelerator: [bold]{probe.accel}[/] ({common.esc(probe.reason)})")

    if no_image:
        return
    if dry_run:
        from smolvm.images.builder import ImageBuilder

        b = ImageBuilder(common.image_dir())
        state = "up to date" if (b.get() and b.is_current()) else "would be built"
        err.print(f"default image: {state} ({b.cache_dir})")
        return
    from smolvm.cli.images import ensure_image

    ensure_image(force=force_image, quiet_if_ready=False)
    err.print("[green]setup complete[/]: try `smolvm demo`")


def _main(argv: list[str]) -> int:
    """``python -m smolvm.cli.setup --print-packages`` — for scripts/setup-host.sh."""
    if "--print-packages" in argv:
        sys.stdout.write("\n".join(HOST_PACKAGES) + "\n")
        return 0
    sys.stderr.write("usage: python -m smolvm.cli.setup --print-packages\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
