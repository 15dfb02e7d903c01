"""Guest kernel from Debian's package: download, extract, and unpack the bzImage to vmlinux.

The uncompressed ELF boots through PVH with ``-kernel vmlinux`` and skips the in-guest
decompressor, which is slow under TCG (see platform notes).
"""

from __future__ import annotations

import lzma
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from smolvm.exceptions import ImageError

KERNEL_META_PACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass
class KernelTree:
    version: str  # e.g. "6.1.0-56-amd64"
    package: str  # e.g. "linux-image-6.1.0-56-amd64=6.1.192-2"
    root: Path  # extracted package root (boot/, lib/modules/)
    vmlinux: Path


def run(argv: list[str], cwd: Path | None = None, what: str = "") -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(
            f"{argv[0]} is not installed ({what or 'image build'}); run `smolvm setup` "
            "or scripts/setup.sh to install the host packages"
        ) from exc
    if proc.returncode != 0:
        raise ImageError(
            f"{' '.join(argv[:3])} failed ({what}): {proc.stderr.strip()[-800:]}",
            {"argv": argv, "returncode": proc.returncode},
        )
    return proc.stdout


def resolve_kernel_package() -> tuple[str, str]:
    """(package name, version) the meta package currently points at."""
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE], what="resolving kernel package")
    m = re.search(r"Depends: (linux-image-[\w.+-]+)", out)
    if not m:
        raise ImageError(f"cannot resolve {KERNEL_META_PACKAGE}: run `apt-get update` and retry")
    name = m.group(1)
    pol = run(["apt-cache", "policy", name], what="kernel version")
    vm = re.search(r"Candidate: (\S+)", pol)
    return name, vm.group(1) if vm else "unknown"


def _give_to_apt(d: Path) -> None:
    """As root, apt downloads as its sandbox user ``_apt``: that user gets the directory
    (0700), not everyone (0777 would let any local user swap the .debs we unpack as root)."""
    if os.geteuid() != 0:
        return
    try:
        apt = pwd.getpwnam("_apt")
    except KeyError:
        return  # no sandbox user: apt downloads as root
    os.chown(d, apt.pw_uid, apt.pw_gid)
    d.chmod(0o700)


def download_debs(names: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` into ``dest`` (run as a throwaway cwd so apt's sandbox user can write)."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smolvm-apt-"))
    try:
        _give_to_apt(tmp)
        run(["apt-get", "download", "-q", *names], cwd=tmp, what="downloading Debian packages")
        out = []
        for deb in tmp.glob("*.deb"):
            target = dest / deb.name
            shutil.move(str(deb), target)
            out.append(target)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Find the xz payload inside a bzImage and decompress it to an ELF vmlinux."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    while start != -1:
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            elf = dec.decompress(data[start:])
            if elf[:4] == b"\x7fELF":
                out.write_bytes(elf)
                return out
        except lzma.LZMAError:
            pass
        start = data.find(XZ_MAGIC, start + 1)
    raise ImageError(f"no xz-compressed ELF payload found in {bzimage}")


def fetch_kernel(work: Path) -> KernelTree:
    """Download and unpack the current Debian kernel into ``work``; returns its tree."""
    name, version = resolve_kernel_package()
    debs = download_debs([name], work / "debs")
    root = work / "kernel-root"
    root.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(debs[0]), str(root)], what="extracting kernel")
    kver = name.removeprefix("linux-image-")
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.exists():
        raise ImageError(f"{vmlinuz} missing from {debs[0].name}")
    run(["depmod", "-b", str(root), kver], what="indexing kernel modules")
    vmlinux = extract_vmlinux(vmlinuz, work / "vmlinux")
    return KernelTree(kver, f"{name}={version}", root, vmlinux)


def module_closure(tree: KernelTree, modules: list[str], skip: set[str]) -> list[Path]:
    """Module files needed for ``modules``, dependencies first, without duplicates."""
    ordered: list[Path] = []
    seen: set[Path] = set()
    for mod in modules:
        out = run(
            ["modprobe", "-d", str(tree.root), "-S", tree.version, "--show-depends", mod],
            what=f"resolving module {mod}",
        )
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p.stem in skip or p in seen:
                    continue
                seen.add(p)
                ordered.append(p)
    return ordered


MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def without_signature(ko: bytes) -> bytes:
    """A kernel module without its appended signature.

    The guest kernel does not enforce module signatures, but it verifies a signature that is
    there: it hashes the whole module under TCG (~10-30 ms a module, ~1/3 of each insmod).
    The modules come from Debian's package, which apt verified when it was downloaded."""
    if not ko.endswith(MODULE_SIG_MAGIC):
        return ko
    # struct module_signature (12 bytes, sig_len big-endian in its last 4) precedes the magic.
    end = len(ko) - len(MODULE_SIG_MAGIC)
    sig_len = int.from_bytes(ko[end - 4 : end], "big")
    cut = end - 12 - sig_len
    if cut <= 0:
        raise ImageError("a kernel module's signature trailer is malformed")
    return ko[:cut]
