"""ImageBuilder: guest images built offline from Debian packages, cached by their inputs.

An image is a directory ``<image_dir>/<name>/`` holding ``vmlinux`` (PVH kernel),
``initrd.cpio`` (stage-1: busybox + modules), ``rootfs.ext4`` and ``manifest.json``.
The slow parts (kernel download, debootstrap) are cached separately and shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from smolvm.exceptions import ImageError, ValidationError
from smolvm.guest import AGENT_SOURCES, build_agent
from smolvm.images import kernel as kmod
from smolvm.images import rootfs as rfs
from smolvm.images.alpine import build_alpine
from smolvm.images.artifacts import DEFAULT_IMAGE, ImageArtifacts, load_manifest
from smolvm.images.cpio import CpioWriter
from smolvm.locks import file_lock
from smolvm.paths import resolve_data_dir, resolve_image_dir

log = logging.getLogger(__name__)

BUILDER_VERSION = "3"  # 2: manifest key rootfs_size_mib; 3: unsigned stage-1 modules, vsock on demand
GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
STAGE1_MODULES = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
]
#: Loaded by stage 1 only when the VM has a vsock device (Firecracker's agent channel).
VSOCK_MODULES = ["vmw_vsock_virtio_transport"]
#: Loaded by stage 1 only for VMs with workspace mounts (``smolvm.shares=1``).
SHARE_MODULES = ["9pnet_virtio", "9p", "overlay"]
# crc32c-intel fails to load under TCG and costs 100 ms; crc32c_generic serves ext4.
SKIP_MODULES = {"crc32c-intel"}
BUSYBOX_APPLETS = [
    "sh",
    "mount",
    "umount",
    "insmod",
    "switch_root",
    "cat",
    "usleep",
    "echo",
    "poweroff",
    "mkdir",
    "sleep",
    "ls",
    "dd",
]
Progress = Callable[[str], None]


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _agent_sources() -> list[Path]:
    return [Path(p) for p in AGENT_SOURCES if Path(p).exists()]


class ImageBuilder:
    """Builds and caches guest images. ``cache_dir`` defaults to ``<data_dir>/images``
    (or ``$SMOLVM_IMAGE_DIR``)."""

    def __init__(self, cache_dir: Path | str | None = None, *, progress: Progress | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else resolve_image_dir(resolve_data_dir())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._progress = progress

    # ---------------------------------------------------------------- helpers
    def _say(self, msg: str) -> None:
        log.info(msg)
        if self._progress:
            self._progress(msg)

    def _lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Serialise builds of one artefact across processes."""
        return file_lock(self.cache_dir / f".{name}.lock")

    def local_inputs_key(self, packages: list[str], size_mib: int, password: str | None, distro: str) -> str:
        files = [GUEST_DIR / "init.sh", GUEST_DIR / "stage1-init.sh", Path(rfs.__file__), *_agent_sources()]
        blobs = [p.read_bytes() for p in files if p.exists()]
        return _sha(BUILDER_VERSION, distro, ",".join(packages), str(size_mib), password or "", *blobs)

    # ---------------------------------------------------------------- public API
    def image_path(self, name: str) -> Path:
        return self.cache_dir / name

    def get(self, name: str = DEFAULT_IMAGE) -> ImageArtifacts | None:
        d = self.image_path(name)
        m = load_manifest(d)
        if m is None or not all((d / f).exists() for f in ("vmlinux", "initrd.cpio", "rootfs.ext4")):
            return None
        return ImageArtifacts(name, d, d / "vmlinux", d / "initrd.cpio", d / "rootfs.ext4", m)

    def is_current(self, name: str = DEFAULT_IMAGE) -> bool:
        art = self.get(name)
        if art is None:
            return False
        m = art.manifest
        want = self.local_inputs_key(
            m.get("packages", []), m.get("rootfs_size_mib", 0), None, m.get("distro", "debian")
        )
        return m.get("local_key") == want or bool(m.get("password"))

    def ensure_default(self) -> ImageArtifacts:
        """The default image, building it (minutes, once) if missing or out of date."""
        art = self.get(DEFAULT_IMAGE)
        if art is not None and self.is_current(DEFAULT_IMAGE):
            return art
        return self.build_image(DEFAULT_IMAGE)

    def list_images(self) -> list[ImageArtifacts]:
        out = []
        for d in sorted(self.cache_dir.iterdir()):
            if d.is_dir() and not d.name.startswith((".", "_")):
                art = self.get(d.name)
                if art:
                    out.append(art)
        return out

    def remove(self, name: str) -> None:
        d = self.image_path(name)
        if not (d / "manifest.json").exists():
            raise ImageError(f"no image named {name!r} in {self.cache_dir}")
        shutil.rmtree(d)

    def prune(self) -> list[str]:
        """Remove cached intermediate artefacts not used by any image; returns what went."""
        used = {a.manifest.get("kernel_key") for a in self.list_images()}
        used |= {a.manifest.get("base_key") for a in self.list_images()}
        removed = []
        for sub in ("_kernels", "_bases"):
            base = self.cache_dir / sub
            for p in base.glob("*") if base.exists() else []:
                if p.name.split(".")[0] not in used:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(str(p))
        return removed

    def build_debian_ssh(
        self, name: str = "debian-ssh", ssh_password: str | None = None, rootfs_size_mb: int = 2048
    ) -> tuple[Path, Path]:
        """Build a Debian image with SSH + agent offline; returns ``(kernel, rootfs)``.
        ``rootfs_size_mb`` is in MiB (the public API's name)."""
        art = self.build_image(name, ssh_password=ssh_password, rootfs_size_mib=rootfs_size_mb)
        return art.kernel, art.rootfs

    def build_alpine_ssh(self, name: str, ssh_password: str, rootfs_size_mb: int = 512) -> tuple[Path, Path]:
        """Build an Alpine image with SSH; needs Alpine's mirror. Returns ``(kernel, rootfs)``.
        ``rootfs_size_mb`` is in MiB (the public API's name)."""
        if not ssh_password:
            raise ValidationError("ssh_password must be a non-empty string", field="ssh_password")
        art = build_alpine(self, name, ssh_password, rootfs_size_mb)
        return art.kernel, art.rootfs

    def ensure_alpine(self, name: str = "alpine") -> ImageArtifacts:
        """The Alpine image ``name`` (key authentication only), built on first use; needs
        Alpine's mirror (``SMOLVM_ALPINE_MIRROR``), else ``ImageError``."""
        return self.get(name) or build_alpine(self, name, None, 512)

    def build_image(
        self,
        name: str,
        *,
        ssh_password: str | None = None,
        rootfs_size_mib: int = 2048,
        packages: list[str] | None = None,
        force: bool = False,
    ) -> ImageArtifacts:
        """Build (or return the cached) Debian image ``name``. Only artifacts: the
        ready-to-restore snapshot is the snapshot layer's (``smolvm.snapshots``)."""
        packages = list(packages or rfs.DEBIAN_PACKAGES)
        key = self.local_inputs_key(packages, rootfs_size_mib, ssh_password, "debian")

        def populate(tree: Path) -> dict:
            base_tar = self._debian_base(packages)
            rfs.unpack_tree(base_tar, tree)
            return {"suite": rfs.DEBIAN_SUITE, "packages": packages, "base_key": base_tar.name.split(".")[0]}

        return self.assemble(
            name,
            "debian",
            key,
            populate,
            rootfs_size_mib=rootfs_size_mib,
            ssh_password=ssh_password,
            force=force,
        )

    def assemble(
        self,
        name: str,
        distro: str,
        local_key: str,
        populate: Callable[[Path], dict],
        *,
        rootfs_size_mib: int,
        ssh_password: str | None,
        force: bool = False,
    ) -> ImageArtifacts:
        """Shared tail of every build: ``populate`` fills a tree with a distribution; we add
        our init and agent, pack ext4, link the shared kernel + initrd, write the manifest."""
        if not name or "/" in name or name.startswith((".", "_")):
            raise ValidationError(f"invalid image name {name!r}: use letters, digits, '-'", field="name")
        t0 = time.monotonic()
        with self._lock(name):
            existing = self.get(name)
            if existing and not force and existing.manifest.get("local_key") == local_key:
                return existing
            kern = self._kernel_and_initrd()
            out = self.image_path(name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache_dir))
            try:
                self._say(f"[{name}] assembling root filesystem ({distro})")
                tree = tmp / "tree"
                tree.mkdir()
                extra = populate(tree)
                agent = self._build_agent(tmp)
                rfs.install_guest_files(tree, agent, GUEST_DIR / "init.sh", password=ssh_password)
                self._say(f"[{name}] writing ext4 image ({rootfs_size_mib} MiB, sparse)")
                rfs.make_ext4(tree, tmp / "rootfs.ext4", rootfs_size_mib)
                shutil.rmtree(tree)
                for f in ("vmlinux", "initrd.cpio"):
                    os.link(kern / f, tmp / f)
                manifest = {
                    "name": name,
                    "distro": distro,
                    "rootfs_size_mib": rootfs_size_mib,
                    "kernel_key": kern.name,
                    "kernel": json.loads((kern / "kernel.json").read_text()),
                    "local_key": local_key,
                    "agent": agent is not None,
                    "ssh": True,
                    "password": bool(ssh_password),
                    "built_at": time.time(),
                    "build_seconds": round(time.monotonic() - t0, 1),
                    **extra,
                }
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._say(f"[{name}] ready in {time.monotonic() - t0:.1f} s")
            art = self.get(name)
            assert art is not None
            return art

    def _build_agent(self, work: Path) -> Path | None:
        if not all(Path(p).exists() for p in AGENT_SOURCES):
            log.warning("guest agent sources missing; image will use SSH only")
            return None
        self._say("compiling the guest agent (static)")
        return build_agent(work / "agent")

    def _kernel_and_initrd(self) -> Path:
        """Shared kernel + stage-1 initramfs, keyed by the kernel package and stage-1 inputs."""
        kdir = self.cache_dir / "_kernels"
        kdir.mkdir(exist_ok=True)
        stage1 = (GUEST_DIR / "stage1-init.sh").read_bytes()
        pkg, ver = kmod.resolve_kernel_package()
        key = _sha(
            BUILDER_VERSION,
            pkg,
            ver,
            stage1,
            ",".join(STAGE1_MODULES),
            ",".join(SHARE_MODULES),
            ",".join(VSOCK_MODULES),
            "unsigned-modules",
        )
        out = kdir / key
        if (out / "kernel.json").exists():
            return out
        with self._lock("kernel"):
            if (out / "kernel.json").exists():
                return out
            self._say(f"downloading and unpacking kernel {pkg} {ver}")
            work = Path(tempfile.mkdtemp(prefix=".k-", dir=kdir))
            try:
                tree = kmod.fetch_kernel(work)
                self._say("building stage-1 initramfs")
                mods = kmod.module_closure(tree, STAGE1_MODULES, SKIP_MODULES)
                busybox = self._busybox_static(work)
                cpio = CpioWriter()
                for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
                    cpio.dir(d)
                cpio.chardev("dev/console", 5, 1)
                cpio.chardev("dev/null", 1, 3, 0o666)
                cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
                for a in BUSYBOX_APPLETS:
                    cpio.symlink(f"bin/{a}", "busybox")
                cpio.file("init", stage1, 0o755)
                order = []
                for m in mods:
                    cpio.file(f"lib/modules/{m.name}", kmod.without_signature(m.read_bytes()), 0o644)
                    order.append(m.name)
                cpio.file("lib/modules/order", ("\n".join(order) + "\n").encode())
                for group, names in (("shares", SHARE_MODULES), ("vsock", VSOCK_MODULES)):
                    extra = [m for m in kmod.module_closure(tree, names, SKIP_MODULES) if m.name not in order]
                    for m in extra:
                        cpio.file(f"lib/modules/{m.name}", kmod.without_signature(m.read_bytes()), 0o644)
                    names_txt = "".join(f"{m.name}\n" for m in extra)
                    cpio.file(f"lib/modules/order.{group}", names_txt.encode())
                cpio.write(work / "initrd.cpio")
                os.replace(tree.vmlinux, work / "vmlinux")
                (work / "kernel.json").write_text(
                    json.dumps({"package": tree.package, "version": tree.version, "modules": order})
                )
                final = work.with_name(key)
                for junk in ("kernel-root", "debs"):
                    shutil.rmtree(work / junk, ignore_errors=True)
                os.replace(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return out

    def _busybox_static(self, work: Path) -> Path:
        debs = kmod.download_debs(["busybox-static"], work / "debs")
        root = work / "bb"
        kmod.run(["dpkg-deb", "-x", str(debs[0]), str(root)], what="extracting busybox")
        return root / "bin" / "busybox"

    def _debian_base(self, packages: list[str]) -> Path:
        """debootstrap result as a tarball, cached by suite + package list (~1 min to make)."""
        bdir = self.cache_dir / "_bases"
        bdir.mkdir(exist_ok=True)
        key = _sha(BUILDER_VERSION, rfs.DEBIAN_SUITE, ",".join(sorted(packages)))
        tar = bdir / f"{key}.tar"
        if tar.exists():
            return tar
        with self._lock("base"):
            if tar.exists():
                return tar
            self._say(f"debootstrap {rfs.DEBIAN_SUITE} (minbase + {len(packages)} packages, ~1 min)")
            work = Path(tempfile.mkdtemp(prefix=".b-", dir=bdir))
            try:
                rfs.debootstrap(work / "root", packages)
                rfs.trim(work / "root")
                rfs.pack_tree(work / "root", work / "base.tar")
                os.replace(work / "base.tar", tar)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return tar
