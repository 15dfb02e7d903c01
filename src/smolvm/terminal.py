"""Interactive terminals in the guest: ``vm.pty()`` returns a :class:`PtyHandle`.

The agent opens a pseudo-terminal in the guest and runs the command (a login shell by
default) as the leader of a new session on it, so job control, ^C and full-screen programs
behave as in a terminal. Output the caller has not read yet is kept up to ``max_buffer``
bytes; beyond that the oldest bytes are dropped and counted in :attr:`PtyHandle.dropped`
(a guest can print without end; the host's memory is bounded).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from smolvm.exceptions import OperationTimeoutError
from smolvm.transports.base import ProcessHandle
from smolvm.types import CommandResult

#: Unread output kept per PTY session (bytes) when no ``on_data`` callback is given.
DEFAULT_PTY_BUFFER = 8 * 1024 * 1024


class PtyHandle:
    """An interactive terminal session in the guest (E2B's PTY handle is the model).

    ``read`` returns output as it arrives (unless an ``on_data`` callback takes it);
    ``write`` types into the terminal; ``resize`` changes its window (characters);
    ``wait`` returns the session's :class:`CommandResult` (exit code; output is not kept
    there). Closing the handle, or leaving its ``with`` block, kills the session.
    """

    def __init__(
        self,
        start: Callable[[Callable[[bytes], None]], ProcessHandle],
        on_data: Callable[[bytes], None] | None = None,
        max_buffer: int = DEFAULT_PTY_BUFFER,
    ) -> None:
        self._on_data = on_data
        self._max = max_buffer
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        #: Output bytes dropped because nobody read them (over ``max_buffer``).
        self.dropped = 0
        self._cond = threading.Condition()
        self._proc = start(self._receive)
        self.pid = self._proc.pid

    def _receive(self, data: bytes) -> None:  # the transport's reader thread
        if self._on_data is not None:
            self._on_data(data)
            return
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            while self._size > self._max:
                old = self._chunks.popleft()
                cut = min(len(old), self._size - self._max)
                if cut < len(old):
                    self._chunks.appendleft(old[cut:])
                self._size -= cut
                self.dropped += cut
            self._cond.notify_all()

    def read(self, timeout: float | None = None) -> bytes:
        """All output received and not read yet; waits up to ``timeout`` seconds (None:
        until there is some) when there is none. Returns b"" on timeout or once the session
        ended and everything was read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            # The session's end is not signalled here: look at it every 0.2 s.
            while not self._chunks and self._proc.is_running():
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)
            out = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
        return out

    def read_until(self, marker: bytes | str, timeout: float = 10.0) -> bytes:
        """Output up to and including ``marker`` (then the rest stays unread); raises
        ``OperationTimeoutError`` after ``timeout`` seconds without it."""
        want = marker.encode() if isinstance(marker, str) else marker
        got = b""
        deadline = time.monotonic() + timeout
        while want not in got:
            left = deadline - time.monotonic()
            if left <= 0 or (not self.is_running() and not self._chunks):
                raise OperationTimeoutError(
                    f"{want!r} did not appear on the terminal within {timeout:g} s; "
                    f"last output: {got[-300:]!r}",
                    timeout,
                )
            got += self.read(min(left, 0.2))
        end = got.index(want) + len(want)
        if end < len(got):
            with self._cond:
                self._chunks.appendleft(got[end:])
                self._size += len(got) - end
        return got[:end]

    def write(self, data: bytes | str) -> None:
        """Type ``data`` into the terminal (str is sent as UTF-8; b"\\x03" is ^C)."""
        self._proc.write(data.encode() if isinstance(data, str) else data)

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size in characters; the guest's programs get SIGWINCH."""
        self._proc.resize(cols, rows)  # the transport's handle checks the size

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the session ends (``timeout`` seconds; None: forever) and return its
        result; ``OperationTimeoutError`` if it still runs then (it keeps running)."""
        return self._proc.wait(timeout)

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` to the session's process group."""
        self._proc.kill(signal)

    def is_running(self) -> bool:
        return self._proc.is_running()

    def close(self) -> None:
        """Kill the session if it still runs (idempotent)."""
        if self._proc.is_running():
            self._proc.kill()

    def __enter__(self) -> PtyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PtyHandle(pid={self.pid}, running={self.is_running()})"
