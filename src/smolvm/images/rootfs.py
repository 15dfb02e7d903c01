"""Root filesystems: a Debian minbase tree (debootstrap) customised with our init and agent,
packed into an ext4 image with ``mkfs.ext4 -d`` (no loop mount, no root-only mount step)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from smolvm.exceptions import ImageError
from smolvm.images.kernel import run

DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Packages on top of minbase: the issue's list plus the SSH server (dropbear: boots
#: 2 s faster than openssh-server under TCG), sftp for scp, and busybox-static for the
#: fast command shell.
DEBIAN_PACKAGES = [
    "python3",
    "bash",
    "coreutils",
    "iproute2",
    "dropbear-bin",
    "openssh-sftp-server",
    "busybox-static",
    "e2fsprogs",
    "procps",
    "ca-certificates",
]
ROOT_LABEL = "smolvm-root"
_TRIM = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
]


def mirror() -> str:
    return os.environ.get("SMOLVM_DEBIAN_MIRROR", DEFAULT_MIRROR)


def debootstrap(dest: Path, packages: list[str]) -> None:
    """Run debootstrap (minbase) into ``dest``. Needs root and the Debian mirror."""
    if os.geteuid() != 0:
        raise ImageError(
            "building the Debian rootfs needs root (debootstrap chroots); run `sudo smolvm "
            "setup` once, or point SMOLVM_IMAGE_DIR at an already built image"
        )
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is not installed: run scripts/setup.sh (apt-get install debootstrap)")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        DEBIAN_SUITE,
        str(dest),
        mirror(),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        log = dest / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-1500:] if log.exists() else proc.stderr[-1500:]
        raise ImageError(
            f"debootstrap failed (mirror {mirror()} — set SMOLVM_DEBIAN_MIRROR to another "
            f"Debian mirror if it is unreachable):\n{tail}"
        )


def trim(root: Path) -> None:
    for rel in _TRIM:
        p = root / rel
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir(parents=True, exist_ok=True)


def install_guest_files(
    root: Path, agent: Path | None, init_script: Path, *, password: str | None = None
) -> None:
    """Put our init, agent and shell into the tree and set SSH defaults."""
    lib = root / "usr/lib/smolvm"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy2(init_script, lib / "init")
    (lib / "init").chmod(0o755)
    if agent is not None:
        shutil.copy2(agent, lib / "agent")
        (lib / "agent").chmod(0o755)
    sh = lib / "sh"
    if sh.exists() or sh.is_symlink():
        sh.unlink()
    busybox = "/bin/busybox"
    if not (root / busybox.lstrip("/")).exists():
        raise ImageError("busybox (static) missing from the rootfs: include busybox-static / busybox")
    sh.symlink_to(busybox)
    init = root / "init"
    if init.exists() or init.is_symlink():
        init.unlink()
    init.symlink_to("/usr/lib/smolvm/init")
    # Debian's dropbear runs /usr/lib/sftp-server for scp/sftp; the binary lives under openssh.
    sftp = root / "usr/lib/sftp-server"
    if (root / "usr/lib/openssh/sftp-server").exists() and not sftp.is_symlink():
        sftp.symlink_to("/usr/lib/openssh/sftp-server")
    (root / "etc/hostname").write_text("smolvm\n")
    (root / "etc/fstab").write_text("# mounts are made by /usr/lib/smolvm/init\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")
    smol_etc = root / "etc/smolvm"
    smol_etc.mkdir(exist_ok=True)
    if password:
        (smol_etc / "password-auth").write_text("1\n")
        subprocess.run(
            ["chroot", str(root), "chpasswd"],
            input=f"root:{password}\n",
            text=True,
            check=True,
        )
    (root / "root").chmod(0o700)
    tune_login_shell(root)


def tune_login_shell(root: Path) -> None:
    """Keep login-shell start-up free of dynamic execs (~50 ms each under TCG).

    Debian's /etc/profile runs ``id -u`` and root's .profile runs ``mesg``. The uid test
    becomes ``[ -O / ]`` (one stat: / belongs to root, so it holds exactly for root; a
    ``read`` loop over /proc/self/status made every login shell ~40% slower than a raw one,
    as busybox reads it a byte per syscall), and the tty is touched only when there is one. Root's
    shell is our static busybox sh so ``ssh vm cmd`` starts fast; interactive logins still get
    bash through .profile."""
    profile = root / "etc/profile"
    if profile.exists():
        text = profile.read_text()
        if '[ "$(id -u)" -eq 0 ]' in text:
            profile.write_text(text.replace('[ "$(id -u)" -eq 0 ]', "[ -O / ]"))
    rprof = root / "root/.profile"
    if rprof.exists():
        text = rprof.read_text().replace("mesg n 2> /dev/null || true", "[ -t 0 ] && mesg n 2> /dev/null")
        if (root / "bin/bash").exists() and "exec /bin/bash" not in text:
            text += "\n# Interactive logins get bash; commands (-c, even on a terminal) run in the\n"
            text += "# fast static shell.\n"
            text += 'case $- in *i*) [ -z "${BASH-}" ] && exec /bin/bash -l ;; esac\n'
        rprof.write_text(text)
    passwd = root / "etc/passwd"
    if passwd.exists():
        lines = passwd.read_text().splitlines()
        out = []
        for line in lines:
            f = line.split(":")
            if f[0] == "root" and len(f) == 7:
                f[6] = "/usr/lib/smolvm/sh"
                line = ":".join(f)
            out.append(line)
        passwd.write_text("\n".join(out) + "\n")
    shells = root / "etc/shells"
    if shells.exists() and "/usr/lib/smolvm/sh" not in shells.read_text():
        with open(shells, "a") as sh:
            sh.write("/usr/lib/smolvm/sh\n")


def pack_tree(root: Path, tar_path: Path) -> None:
    """Cache a tree as a tarball (keeps owners, modes, devices)."""
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname=".")


def unpack_tree(tar_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        extract_all(tar, dest)


def make_ext4(root: Path, image: Path, size_mib: int) -> Path:
    """Pack ``root`` into a sparse ext4 image labelled ``smolvm-root``."""
    used_mb = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True).stdout.split()[0])
    if size_mib < used_mb + 64:
        raise ImageError(
            f"rootfs_size_mb={size_mib} is too small: the tree needs {used_mb} MiB plus 64 MiB "
            f"headroom; use at least {used_mb + 64}"
        )
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(tmp),
        ],
        what="creating the ext4 root filesystem",
    )
    os.replace(tmp, image)
    return image


def extract_all(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack one of our own archives (built here, or Debian's checked packages) whole.
    Python >= 3.11.4 wants the filter named; older 3.11 (Debian 12's 3.11.2) has none and
    behaves like "fully_trusted"."""
    if hasattr(tarfile, "fully_trusted_filter"):
        tar.extractall(dest, filter="fully_trusted")
    else:
        tar.extractall(dest)
