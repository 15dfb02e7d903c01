"""Image building entry points (compatible with ``smolvm.build`` of the public API)."""

from smolvm.images.artifacts import ImageArtifacts
from smolvm.images.builder import ImageBuilder
from smolvm.types import DEFAULT_BOOT_ARGS

#: Kernel arguments for images with SSH: serial console, reboot on panic, and our init
#: (which starts the SSH server and guest agent). Extra arguments SmolVM needs on a given
#: host (e.g. ``tsc_early_khz``) are appended at boot.
SSH_BOOT_ARGS = DEFAULT_BOOT_ARGS

__all__ = ["ImageBuilder", "ImageArtifacts", "SSH_BOOT_ARGS"]
