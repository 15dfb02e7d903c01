"""Guest images: kernel, stage-1 initramfs, root filesystem and per-VM config disks."""

from typing import TYPE_CHECKING, Any

from smolvm.images.artifacts import DEFAULT_IMAGE, ImageArtifacts

if TYPE_CHECKING:
    from smolvm.images.builder import ImageBuilder


def __getattr__(name: str) -> Any:
    if name == "ImageBuilder":
        from smolvm.images.builder import ImageBuilder  # ~7 ms (Alpine, kernel, cpio): on first use

        return ImageBuilder
    raise AttributeError(f"module 'smolvm.images' has no attribute {name!r}")


__all__ = ["ImageBuilder", "ImageArtifacts", "DEFAULT_IMAGE"]
