"""SmolVM's exception tree: one shallow hierarchy rooted at :class:`SmolVMError`.

Lower layers (QMP, paramiko, sqlite, subprocess) never leak their own exception types
through the public API; they are mapped to the most specific class below.
"""

from __future__ import annotations

from typing import Any


class SmolVMError(Exception):
    """Base class of every error SmolVM raises.

    Attributes:
        message: human-readable description of what went wrong.
        details: structured context (ids, paths, values) for logs and programs.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message


class ValidationError(SmolVMError, ValueError):
    """A configuration value or argument is invalid. ``details['field']`` names it."""

    def __init__(self, message: str, field: str | None = None, details: dict[str, Any] | None = None) -> None:
        d = dict(details or {})
        if field is not None:
            d.setdefault("field", field)
        super().__init__(message, d)
        self.field = field


class VMNotFoundError(SmolVMError, LookupError):
    """No VM with the given id exists in the state store."""

    def __init__(self, vm_id: str, message: str | None = None) -> None:
        super().__init__(
            message or f"VM {vm_id!r} not found. Run `smolvm list` to see existing VMs.",
            {"vm_id": vm_id},
        )
        self.vm_id = vm_id


class VMAlreadyExistsError(SmolVMError):
    """A VM with the given id already exists."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(
            f"VM {vm_id!r} already exists. Choose another vm_id or delete it first "
            f"(`smolvm delete {vm_id}`).",
            {"vm_id": vm_id},
        )
        self.vm_id = vm_id


class InvalidStateError(SmolVMError):
    """The operation is not allowed in the VM's current state."""


class NetworkError(SmolVMError):
    """Host networking (port forward, TAP, nftables) could not be set up or torn down."""


class ImageError(SmolVMError):
    """A guest image could not be built, found or verified."""


class BackendError(SmolVMError):
    """The hypervisor backend (QEMU, Firecracker) failed."""


class SnapshotError(SmolVMError):
    """A snapshot could not be taken, found or restored."""


class SnapshotNotFoundError(SnapshotError, LookupError):
    """No snapshot with the given name exists."""


class OperationTimeoutError(SmolVMError, TimeoutError):
    """An operation (boot, command, stop) did not finish within its timeout (seconds)."""

    def __init__(
        self, message: str, timeout: float | None = None, details: dict[str, Any] | None = None
    ) -> None:
        d = dict(details or {})
        if timeout is not None:
            d.setdefault("timeout", timeout)
        super().__init__(message, d)
        self.timeout = timeout


# Alias kept for code written against the name used in SmolVMManager's docs.
VMTimeoutError = OperationTimeoutError


class CommandExecutionUnavailableError(SmolVMError):
    """Commands cannot be run in this VM (no SSH server / agent reachable).

    Attributes:
        remediation: a concrete step that fixes the problem.
    """

    def __init__(self, message: str, remediation: str, vm_id: str | None = None) -> None:
        super().__init__(message, {"vm_id": vm_id, "remediation": remediation})
        self.remediation = remediation
        self.vm_id = vm_id


class TransportError(SmolVMError):
    """The command channel (SSH or guest agent) failed while talking to the guest."""


class CommandFateUnknownError(TransportError):
    """The channel dropped after the command may have started: it may have run (fully or in
    part) or not at all. SmolVM does not retry it; check the guest before running it again."""


class GuestCrashedError(TransportError):
    """The guest died under a running call (kernel panic, VMM exit): the VM is now ERROR.
    The message ends with the tail of its serial console."""


class SandboxLostError(SmolVMError):
    """A fleet sandbox is gone with its node (the node died or left the cluster, or its
    actor was killed). Its result is unknown; sandboxes on other nodes are not affected."""


class CommandBlockedError(SmolVMError):
    """Raised from ``Callback.on_pre_run`` to veto a command before it reaches the guest."""

    def __init__(self, message: str, vm_id: str | None = None, command: str | None = None) -> None:
        super().__init__(message, {"vm_id": vm_id, "command": command})
        self.vm_id = vm_id
        self.command = command
        #: The guard's verdict object, when a built-in guard blocked (rule, reason, ...).
        self.verdict: Any = None


class AgentError(TransportError):
    """The guest agent refused or failed an operation (``errno`` is the guest's errno, or 0)."""

    def __init__(self, message: str, err: int = 0, details: dict[str, Any] | None = None) -> None:
        d = dict(details or {})
        d.setdefault("errno", err)
        super().__init__(message, d)
        self.errno: int | None = err


class GuestFileNotFoundError(AgentError, FileNotFoundError):
    """A guest path does not exist (also catchable as ``FileNotFoundError``)."""


class TransferLimitError(TransportError):
    """A file from the guest was larger than the ``max_bytes`` the caller allowed (nothing
    was written at the destination)."""


class StateError(SmolVMError):
    """The state database is unreadable, locked for too long, or from a newer SmolVM."""


__all__ = [
    "TransferLimitError",
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
    "TransportError",
    "CommandBlockedError",
    "CommandFateUnknownError",
    "GuestCrashedError",
    "AgentError",
    "GuestFileNotFoundError",
    "StateError",
]
