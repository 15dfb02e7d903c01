"""SmolVM: disposable, hardware-isolated Linux microVMs for AI agents.

from smolvm import SmolVM
with SmolVM() as vm:
    print(vm.run("echo hi").output)
"""

from smolvm.aio import AsyncSmolVM
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
from smolvm.images.builder import ImageBuilder
from smolvm.pools import WarmPool
from smolvm.smolvm import SmolVM
from smolvm.snapshots import SnapshotInfo
from smolvm.types import CommandResult, InternetSettings, Limits, VMConfig, VMInfo, VMState, WorkspaceMount
from smolvm.vm import SmolVMManager

__version__ = "0.1.0"

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
