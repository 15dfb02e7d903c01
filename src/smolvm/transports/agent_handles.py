"""Handles the agent transport returns: background processes (and PTY sessions) and
directory watches. They own one stream of a :class:`~smolvm.transports.agent_proto.Conn`."""

from __future__ import annotations

import struct

from smolvm.exceptions import OperationTimeoutError, TransportError, ValidationError
from smolvm.transports.agent_proto import (
    CHUNK,
    FLAG_EOF,
    OP_KILL,
    OP_RESIZE,
    OP_STDIN,
    Conn,
    ExecStream,
    WatchStream,
)
from smolvm.transports.base import ExecRequest, ProcessHandle, check_size
from smolvm.types import CommandResult


class AgentProcessHandle(ProcessHandle):
    """A command started with :meth:`AgentTransport.spawn`."""

    def __init__(self, conn: Conn, sid: int, stream: ExecStream, req: ExecRequest, start: float) -> None:
        self._conn, self._sid, self._s, self._req, self._start = conn, sid, stream, req, start
        self.pid = stream.pid

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the command ends (``timeout`` seconds, None = forever).

        Raises ``OperationTimeoutError`` if it is still running then (it keeps running), or
        if the agent killed it because it exceeded the request's own timeout."""
        if not self._s.done.wait(timeout):
            raise OperationTimeoutError(f"process {self.pid} still running after {timeout:g} s", timeout)
        return result(self._s, self._req, self._s.activity - self._start)

    def forget(self) -> None:
        """Stop following the command (its output and exit are dropped on arrival). A
        detached command keeps running in the guest."""
        self._conn.drop_stream(self._sid)

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` to the command's process group in the guest."""
        if not self._s.done.is_set():
            try:
                self._conn.send(OP_KILL, self._sid, struct.pack("<I", signal))
            except TransportError:
                pass  # connection gone: the agent already killed the command

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin (its terminal, for a PTY session). The agent
        buffers up to 64 MiB the command has not read yet."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValidationError("data must be bytes", field="data")
        if not (self._req.stdin is not None or self._req.pty):
            raise TransportError("this process has no stdin: spawn it with stdin=b'' or as a PTY")
        view = memoryview(data)
        for off in range(0, len(view), CHUNK):
            self._conn.send(OP_STDIN, self._sid, bytes(view[off : off + CHUNK]))

    def close_stdin(self) -> None:
        """End of input (a PTY session: the terminal stays open; send b"\\x04" instead)."""
        self._conn.send(OP_STDIN, self._sid, b"", FLAG_EOF)

    def resize(self, cols: int, rows: int) -> None:
        """Set a PTY session's window size (characters); its programs get SIGWINCH."""
        if not self._req.pty:
            raise TransportError("resize needs a PTY session")
        check_size(cols, rows)
        if not self._s.done.is_set():
            self._conn.send(OP_RESIZE, self._sid, struct.pack("<HH", cols, rows))

    def is_running(self) -> bool:
        return not self._s.done.is_set()

    @property
    def stdout(self) -> bytes:
        return b"".join(list(self._s.out))

    @property
    def stderr(self) -> bytes:
        return b"".join(list(self._s.err))


def abandon(conn: Conn, sid: int) -> None:
    """Stop caring about stream ``sid``: kill its process (or cancel its transfer)."""
    conn.drop_stream(sid)
    try:
        conn.send(OP_KILL, sid, struct.pack("<I", 9))
    except TransportError:
        pass  # connection gone: the agent already ended the session's commands


def result(s: ExecStream, req: ExecRequest, duration: float) -> CommandResult:
    if s.error is not None:
        raise s.error
    out, err = b"".join(s.out), b"".join(s.err)
    if s.timed_out:
        raise OperationTimeoutError(
            # A hostile guest may claim a timeout for a command that had none.
            f"command timed out after {req.timeout if req.timeout is None else f'{req.timeout:g} s'} "
            f"and was killed: {req.command[:200]!r}",
            req.timeout,
            {"stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace")},
        )
    if s.late_error is not None:
        raise s.late_error
    if s.callback_error is not None:
        raise s.callback_error
    return CommandResult.from_bytes(s.exit_code, out, err, duration, s.truncated)


class AgentWatchHandle:
    """A directory watch in the guest (:meth:`AgentTransport.watch`)."""

    def __init__(self, conn: Conn, sid: int, stream: WatchStream) -> None:
        self._conn, self._sid, self._s = conn, sid, stream

    def get(self, timeout: float | None = None) -> tuple[str, str] | None:
        """The next ``(event, path)``; None after ``timeout`` seconds (None: wait) or once
        stopped. Raises the error that ended the watch (the connection dropped, say)."""
        s = self._s
        with s.cond:
            if not s.cond.wait_for(lambda: s.events or s.done.is_set(), timeout):
                return None
            if s.events:
                return s.events.popleft()
        if s.error is not None:
            raise s.error
        return None

    def pending(self) -> list[tuple[str, str]]:
        """Every event received and not yet taken, without waiting."""
        with self._s.cond:
            out = list(self._s.events)
            self._s.events.clear()
        return out

    @property
    def queued(self) -> int:
        """Events received and not taken yet."""
        return len(self._s.events)

    @property
    def stopped(self) -> bool:
        return self._s.done.is_set()

    def stop(self) -> None:
        """End the watch (idempotent); events already received stay readable."""
        if not self._s.done.is_set():
            self._s.close()
            abandon(self._conn, self._sid)
