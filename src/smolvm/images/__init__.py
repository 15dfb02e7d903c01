"""Guest images: kernel, stage-1 initramfs, root filesystem and per-VM config disks."""

from smolvm.images.builder import DEFAULT_IMAGE, ImageArtifacts, ImageBuilder

__all__ = ["ImageBuilder", "ImageArtifacts", "DEFAULT_IMAGE"]
