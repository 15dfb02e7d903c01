#!/usr/bin/env bash
# Idempotent host setup for SmolVM: Debian packages, a virtualenv with the project, and
# (with --image) the default guest image. Safe to run repeatedly; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Host packages: QEMU + qemu-img (VMM, overlays), e2fsprogs (mkfs.ext4 -d), debootstrap
# (rootfs), kmod (module dependency resolution), musl-tools (static guest agent),
# busybox-static (guest shell), nftables + iproute2 (TAP networking), openssh-client (ssh/scp),
# zstd (compressed snapshots), ca-certificates, clang-format (style of the guest agent's C),
# slirp4netns + dnsmasq-base + sniproxy (the sealed user-mode network: each VM's namespace
# uplink, resolver and Host/SNI-checking proxy), socat (TAP-mode port forwards),
# daemontools (multilog: each VM's serial console as capped, rotated files), tmux (the
# tests drive `smolvm shell` through a real terminal).
PACKAGES=(qemu-system-x86 qemu-utils e2fsprogs debootstrap kmod musl-tools busybox-static
          nftables iproute2 openssh-client zstd ca-certificates python3-venv clang-format
          slirp4netns dnsmasq-base sniproxy socat daemontools tmux)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# QEMU drops to this unprivileged system user once it has opened its files (when SmolVM
# runs as root); without it QEMU keeps running as root (`smolvm doctor` warns).
if ! getent passwd smolvm-vmm >/dev/null; then
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin smolvm-vmm
fi
# SmolVM runs sniproxy inside each sandbox's namespace; the package's own host-wide
# service (ports 80/443 on every interface) must not run.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled sniproxy >/dev/null 2>&1; then
  $SUDO systemctl disable --now sniproxy || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's exit status is kept; only this machine's noisy "Location ... ignored" warnings are dropped.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_install --upgrade pip
# torch is pinned in the `classifier` extra (an unpinned one pulls a multi-GB CUDA build).
pip_install -e '.[test,classifier,mcp,ray]'

if [ "${1:-}" = "--image" ]; then
  .venv/bin/python -c "from smolvm.images import ImageBuilder; from smolvm.snapshots import build_default_snapshot; b = ImageBuilder(progress=print); print(b.ensure_default().path); print(build_default_snapshot(image_dir=b.cache_dir))"
fi
echo "setup: ok"
