"""A built guest image on disk (kernel, initrd, rootfs, manifest) and how to find it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Name of the image ``SmolVM()`` uses (a directory under the image dir).
DEFAULT_IMAGE = "default"


@dataclass(frozen=True)
class ImageArtifacts:
    """A built image. Pass ``kernel``/``rootfs`` to ``VMConfig``; the initrd is found
    from the kernel's directory."""

    name: str
    path: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    manifest: dict[str, Any]

    @property
    def has_agent(self) -> bool:
        return bool(self.manifest.get("agent"))

    @property
    def has_ssh(self) -> bool:
        return bool(self.manifest.get("ssh"))


def load_manifest(image_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((image_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def artifacts_for_kernel(kernel_path: Path) -> ImageArtifacts | None:
    """The image a kernel file belongs to (so a config naming only kernel+rootfs gets its initrd)."""
    d = Path(kernel_path).resolve().parent
    m = load_manifest(d)
    if m is None:
        return None
    return ImageArtifacts(m["name"], d, d / "vmlinux", d / "initrd.cpio", d / "rootfs.ext4", m)


__all__ = ["ImageArtifacts", "artifacts_for_kernel", "load_manifest"]
