"""Guest images: kernel, stage-1 initramfs, root filesystem and per-VM config disks."""

from smolvm.images.artifacts import ImageArtifacts
from smolvm.images.builder import DEFAULT_IMAGE, ImageBuilder

__all__ = ["ImageBuilder", "ImageArtifacts", "DEFAULT_IMAGE"]
