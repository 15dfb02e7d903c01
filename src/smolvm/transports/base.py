"""The command-channel interface. One core, two channels (guest agent, SSH).

Every channel runs a command in the guest the *same* way, so results are identical:
``[GUEST_SHELL, "-l", "-c", command]`` for ``shell="login"`` and
``[GUEST_SHELL, "-c", command]`` for ``shell="raw"``. ``GUEST_SHELL`` is a static busybox
ash in our images (dynamic linking dominates exec cost under TCG).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from smolvm.exceptions import TransferLimitError, TransportError, ValidationError
from smolvm.types import CommandResult, Limits

#: Shell used for commands in the guest (busybox ash, static). "login" adds ``-l``.
GUEST_SHELL = "/usr/lib/smolvm/sh"
#: Environment file sourced by login shells (written by ``set_env_vars``).
GUEST_ENV_FILE = "/etc/profile.d/smolvm_env.sh"

ShellMode = Literal["login", "raw"]
OutputCallback = Callable[[bytes], None]


def guest_argv(command: str, shell: str) -> list[str]:
    """The argv that runs ``command`` in the guest for ``shell`` ("login" | "raw")."""
    if shell == "login":
        return [GUEST_SHELL, "-l", "-c", command]
    if shell == "raw":
        return [GUEST_SHELL, "-c", command]
    raise ValueError(f"shell must be 'login' or 'raw', got {shell!r}")


#: Permission bits a downloaded file may keep: the guest is hostile, so never setuid,
#: setgid, sticky or group/world-writable on the host.
DOWNLOAD_MODE_MASK = 0o755


def host_mode(guest_mode: int) -> int:
    """The mode a file downloaded from the guest gets on the host."""
    return guest_mode & DOWNLOAD_MODE_MASK


def check_size(cols: int, rows: int) -> tuple[int, int]:
    """A terminal size (characters), validated."""
    for name, v in (("cols", cols), ("rows", rows)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 0xFFFF:
            raise ValidationError(f"{name} must be an int in 1..65535 (characters), got {v!r}", field=name)
    return cols, rows


@dataclass
class ExecRequest:
    """One command to run. ``timeout`` is in seconds (None = no limit)."""

    command: str
    shell: ShellMode = "login"
    timeout: float | None = 30.0
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stdin: bytes | None = None
    #: Keep running after the host session that started it ends (spawn only).
    detach: bool = False
    #: Caps of the command's session (agent channel; None = the guest's defaults).
    limits: Limits | None = None
    #: SmolVM's own work (identity push), not a user command: no session cgroup.
    host_work: bool = False
    #: Run at the lowest CPU priority (nice 19; agent channel): background work that must
    #: not slow the user's commands down.
    low_priority: bool = False
    #: Bytes of each output stream kept for the result (None = all); the rest still reaches
    #: the output callbacks and the result says ``truncated``.
    max_output_bytes: int | None = None
    #: False: keep no output at all (callbacks only), for streams of any size.
    capture: bool = True
    #: (cols, rows): run on a new pseudo-terminal (agent channel); an empty ``command``
    #: is an interactive login shell.
    pty: tuple[int, int] | None = None

    @property
    def argv(self) -> list[str]:
        if self.pty and not self.command:
            return [GUEST_SHELL, "-l"]
        return guest_argv(self.command, self.shell)


class ProcessHandle(abc.ABC):
    """A command running in the background in the guest (E2B's CommandHandle is the model)."""

    pid: int | None

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the process exits (``timeout`` in seconds) and return its result.

        Raises ``OperationTimeoutError`` if it is still running after ``timeout``
        (the process is *not* killed; call :meth:`kill`)."""

    @abc.abstractmethod
    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` to the process (and its process group) in the guest."""

    @abc.abstractmethod
    def is_running(self) -> bool: ...

    def write(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin (agent channel only)."""
        raise TransportError(f"writing to a running process needs the guest agent channel, not {self!r}")

    def resize(self, cols: int, rows: int) -> None:
        """Set a PTY session's window size (agent channel only)."""
        raise TransportError("PTY sessions need the guest agent channel")

    @property
    @abc.abstractmethod
    def stdout(self) -> bytes:
        """Standard output received so far."""

    @property
    @abc.abstractmethod
    def stderr(self) -> bytes:
        """Standard error received so far."""


class WatchHandle(Protocol):
    """What :meth:`Transport.watch` returns."""

    @property
    def stopped(self) -> bool: ...

    def get(self, timeout: float | None = None) -> tuple[str, str] | None: ...

    def pending(self) -> list[tuple[str, str]]: ...

    def stop(self) -> None: ...


class Transport(abc.ABC):
    """A channel to the guest. Implementations: ``AgentTransport``, ``SSHTransport``."""

    name: str = "abstract"
    #: Connections made to the guest so far (a reused channel keeps this at 1; each
    #: reconnect adds one).
    connects: int = 0

    @abc.abstractmethod
    def exec(
        self,
        req: ExecRequest,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        """Run ``req`` to completion. Output chunks go to the callbacks as they arrive.

        Raises ``OperationTimeoutError`` after killing the guest process when
        ``req.timeout`` (seconds) passes, and ``TransportError`` when the channel fails.
        """

    @abc.abstractmethod
    def spawn(
        self,
        req: ExecRequest,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ProcessHandle:
        """Start ``req`` in the background and return a handle at once."""

    @abc.abstractmethod
    def upload(self, local: Path, remote: str, mode: int | None = None) -> None:
        """Copy a host file into the guest, streaming; keeps ``local``'s mode unless given."""

    @abc.abstractmethod
    def download(self, remote: str, local: Path, max_bytes: int | None = None) -> None:
        """Copy a guest file to the host, streaming; keeps the guest file's mode (see
        ``host_mode``). Over ``max_bytes`` (None: no limit): ``TransferLimitError``."""

    def watch(
        self, path: str, *, recursive: bool = False, on_event: Callable[[str, str], object] | None = None
    ) -> WatchHandle:
        """Watch a guest directory for changes (the agent channel implements it)."""
        raise TransportError(
            f"watching guest files needs the guest agent channel; this VM is reached over {self.name} "
            "(an image built without the agent). Rebuild the image with the agent, or poll files.list()"
        )

    @abc.abstractmethod
    def wait_ready(self, timeout: float) -> None:
        """Block until the channel answers (seconds); raise ``OperationTimeoutError``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection. Idempotent."""


class Counter:
    """Counts the bytes of a download and stops it past ``limit`` (None: no limit)."""

    def __init__(self, remote: str, limit: int | None) -> None:
        self.remote, self.limit, self.n = remote, limit, 0

    def add(self, n: int) -> None:
        self.n += n
        if self.limit is not None and self.n > self.limit:
            raise TransferLimitError(
                f"guest file {self.remote} is larger than max_bytes={self.limit}; nothing was "
                "written. Pass a larger max_bytes (None for no limit) if you expect it"
            )
