"""Alpine images: the minirootfs from Alpine's mirror plus dropbear, with our init/agent.

Needs the mirror (``$SMOLVM_ALPINE_MIRROR``, default dl-cdn.alpinelinux.org). Where it is
unreachable the build fails at once with an ImageError saying so; the Debian builder is
the offline alternative.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from smolvm.exceptions import ImageError
from smolvm.images.artifacts import ImageArtifacts
from smolvm.images.rootfs import extract_all


class Assembler(Protocol):
    """What Alpine builds need from :class:`smolvm.images.builder.ImageBuilder`."""

    def local_inputs_key(
        self, packages: list[str], size_mib: int, password: str | None, distro: str
    ) -> str: ...

    def assemble(
        self,
        name: str,
        distro: str,
        local_key: str,
        populate: Callable[[Path], dict[str, Any]],
        *,
        rootfs_size_mib: int,
        ssh_password: str | None,
        force: bool = False,
    ) -> ImageArtifacts: ...


ALPINE_BRANCH = "v3.20"
ALPINE_RELEASE = "3.20.3"
DEFAULT_ALPINE_MIRROR = "https://dl-cdn.alpinelinux.org/alpine"
ALPINE_PACKAGES = ["dropbear", "openssh-sftp-server", "bash", "e2fsprogs-extra", "iproute2"]


def alpine_mirror() -> str:
    return os.environ.get("SMOLVM_ALPINE_MIRROR", DEFAULT_ALPINE_MIRROR).rstrip("/")


def minirootfs_url() -> str:
    return (
        f"{alpine_mirror()}/{ALPINE_BRANCH}/releases/x86_64/alpine-minirootfs-{ALPINE_RELEASE}-x86_64.tar.gz"
    )


def _download(url: str, dest: Path, timeout: float = 20.0) -> None:
    import urllib.request  # with http.client and ssl ~7 ms of `import smolvm`; rarely needed

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, TimeoutError) as exc:  # URLError is an OSError
        raise ImageError(
            f"Alpine's mirror is unreachable ({url}: {exc}). Set SMOLVM_ALPINE_MIRROR to a "
            "reachable Alpine mirror, or build offline from Debian packages with "
            "ImageBuilder().build_debian_ssh(...)",
            {"url": url},
        ) from exc


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_alpine(
    builder: Assembler, name: str, ssh_password: str | None, rootfs_size_mib: int
) -> ImageArtifacts:
    """An Alpine image (``ssh_password`` None: key authentication only)."""
    key = builder.local_inputs_key(ALPINE_PACKAGES, rootfs_size_mib, ssh_password, f"alpine-{ALPINE_RELEASE}")

    def populate(tree: Path) -> dict[str, Any]:
        work = tree.parent
        tgz = work / "minirootfs.tar.gz"
        url = minirootfs_url()
        _download(url, tgz)
        _download(url + ".sha256", work / "sum")
        want = (work / "sum").read_text().split()[0]
        if _sha256(tgz) != want:
            raise ImageError(f"checksum mismatch for {url}: the download is corrupt; retry")
        with tarfile.open(tgz) as tar:
            extract_all(tar, tree)
        shutil.copy("/etc/resolv.conf", tree / "etc/resolv.conf")
        repos = f"{alpine_mirror()}/{ALPINE_BRANCH}/main\n{alpine_mirror()}/{ALPINE_BRANCH}/community\n"
        (tree / "etc/apk/repositories").write_text(repos)
        proc = subprocess.run(
            ["chroot", str(tree), "/sbin/apk", "add", "--no-cache", *ALPINE_PACKAGES],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise ImageError(f"apk add in the Alpine rootfs failed: {proc.stderr[-800:]}")
        for link in ("usr/lib/sftp-server", "usr/libexec/sftp-server"):
            p = tree / link
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists() and (tree / "usr/lib/ssh/sftp-server").exists():
                p.symlink_to("/usr/lib/ssh/sftp-server")
        return {"release": ALPINE_RELEASE, "packages": ALPINE_PACKAGES, "source": url}

    return builder.assemble(
        name, "alpine", key, populate, rootfs_size_mib=rootfs_size_mib, ssh_password=ssh_password
    )
