"""SmolVM: disposable, hardware-isolated Linux microVMs for AI agents.

from smolvm import SmolVM
with SmolVM() as vm:
    print(vm.run("echo hi").output)
"""

from typing import TYPE_CHECKING, Any

from smolvm.callbacks import Callback, RunContext
from smolvm.exceptions import (
    AgentError,
    BackendError,
    CommandBlockedError,
    CommandExecutionUnavailableError,
    CommandFateUnknownError,
    GuestCrashedError,
    GuestFileNotFoundError,
    ImageError,
    InvalidStateError,
    NetworkError,
    OperationTimeoutError,
    SandboxLostError,
    SmolVMError,
    SnapshotError,
    SnapshotNotFoundError,
    StateError,
    TransferLimitError,
    TransportError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
    VMTimeoutError,
)
from smolvm.files import FileInfo
from smolvm.pools import WarmPool
from smolvm.smolvm import SmolVM
from smolvm.snapshots import SnapshotInfo
from smolvm.types import CommandResult, InternetSettings, Limits, VMConfig, VMInfo, VMState, WorkspaceMount
from smolvm.vm import SmolVMManager

if TYPE_CHECKING:
    from smolvm.aio import AsyncSmolVM
    from smolvm.images.builder import ImageBuilder

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562), not by `import smolvm`.
    if name == "AsyncSmolVM":
        from smolvm.aio import AsyncSmolVM  # asyncio: ~30 ms; only async users pay it

        return AsyncSmolVM
    if name == "ImageBuilder":
        from smolvm.images.builder import ImageBuilder  # ~7 ms: Alpine, kernel, rootfs, cpio

        return ImageBuilder
    raise AttributeError(f"module 'smolvm' has no attribute {name!r}")


__all__ = [
    "SmolVM",
    "AsyncSmolVM",
    "FileInfo",
    "SmolVMManager",
    "VMConfig",
    "VMInfo",
    "VMState",
    "CommandResult",
    "ImageBuilder",
    "Callback",
    "RunContext",
    "WarmPool",
    "SnapshotInfo",
    "Limits",
    "InternetSettings",
    "WorkspaceMount",
    "SmolVMError",
    "ValidationError",
    "VMNotFoundError",
    "VMAlreadyExistsError",
    "InvalidStateError",
    "NetworkError",
    "ImageError",
    "BackendError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "OperationTimeoutError",
    "VMTimeoutError",
    "CommandExecutionUnavailableError",
    "CommandFateUnknownError",
    "GuestCrashedError",
    "SandboxLostError",
    "TransportError",
    "AgentError",
    "GuestFileNotFoundError",
    "TransferLimitError",
    "CommandBlockedError",
    "StateError",
]
