"""SmolVM: disposable, hardware-isolated Linux microVMs for AI agents.

    from smolvm import SmolVM
    with SmolVM() as vm:
        print(vm.run("echo hi").output)
"""

from smolvm.callbacks import Callback, RunContext
from smolvm.exceptions import (
    CommandBlockedError,
    CommandExecutionUnavailableError,
    ImageError,
    NetworkError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from smolvm.facade import SmolVM
from smolvm.pool import WarmPool
from smolvm.snapshots import SnapshotInfo
from smolvm.images.builder import ImageBuilder
from smolvm.types import CommandResult, VMConfig, VMInfo, VMState
from smolvm.vm import SmolVMManager

__version__ = "0.1.0"

__all__ = [
    "SmolVM", "SmolVMManager", "VMConfig", "VMInfo", "VMState", "CommandResult", "ImageBuilder",
    "Callback", "RunContext", "CommandBlockedError", "SmolVMError", "ValidationError",
    "VMNotFoundError", "VMAlreadyExistsError", "OperationTimeoutError",
    "CommandExecutionUnavailableError", "NetworkError", "ImageError", "WarmPool", "SnapshotInfo",
]
