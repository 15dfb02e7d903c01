"""Host side of the guest-agent channel (wire format: ``src/smolvm/guest/agent.h``).

One connection per transport, opened lazily and reopened after it drops. A background
reader thread demultiplexes frames to per-request streams, so any number of threads may
run commands and transfers concurrently over one socket. Output callbacks run on that
reader thread: they must be quick and must not call back into the transport and wait.

Sessions: every connection starts with ``SYNC_MAGIC`` + HELLO(nonce). The guest end of a
virtio-serial port outlives host connections, so the agent treats HELLO as "new host":
commands the previous connection left running are killed. Background processes started
by a command (``server &`` with its output redirected) are not affected.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import math
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    OperationTimeoutError,
    SmolVMError,
    TransportError,
    ValidationError,
)
from smolvm.transports.base import GUEST_SHELL, ExecRequest, OutputCallback, ProcessHandle, Transport
from smolvm.types import CommandResult

log = logging.getLogger(__name__)

PROTO_VERSION = 1
SYNC_MAGIC = b"\x00SMOLVM\x01SYNC\xa5\x5a\xc3\x3c"
HDR = struct.Struct("<2sBBII")  # b"SV", op, flags, stream id, payload length
MAX_PAYLOAD = 256 * 1024  # the agent's limit for host -> agent frames
CHUNK = 64 * 1024
# After a host died mid-frame the agent may still expect that frame's payload: this many
# zero bytes complete any such frame and force the agent to look for SYNC_MAGIC again.
_PADDING = MAX_PAYLOAD + 64

(OP_HELLO, OP_PING, OP_EXEC, OP_STDIN, OP_KILL) = (0x01, 0x02, 0x10, 0x11, 0x12)
(OP_WRITE_FILE, OP_FILE_DATA, OP_FILE_END, OP_READ_FILE, OP_FILE_INFO) = (0x20, 0x21, 0x22, 0x23, 0x24)
(OP_SET_TIME, OP_ADD_ENTROPY, OP_SET_HOSTNAME, OP_SHUTDOWN) = (0x30, 0x31, 0x32, 0x33)
(OP_STARTED, OP_STDOUT, OP_STDERR, OP_EXIT, OP_OK, OP_ERROR) = (0x40, 0x41, 0x42, 0x43, 0x7E, 0x7F)
FLAG_EOF = 0x01
EXEC_STDIN, EXEC_ENV_REPLACE = 0x01, 0x02
WF_FSYNC, WF_MKDIRS = 0x01, 0x02
XF_TIMED_OUT = 0x01

#: Seconds the host waits beyond a command's timeout for the agent to report the kill.
_TIMEOUT_GRACE = 5.0


class AgentError(TransportError):
    """The agent refused or failed an operation (``errno`` is the guest's errno, or 0)."""

    def __init__(self, message: str, err: int = 0, details: dict | None = None) -> None:
        d = dict(details or {})
        d.setdefault("errno", err)
        super().__init__(message, d)
        self.errno = err


class GuestFileNotFoundError(AgentError, FileNotFoundError):
    """A guest path does not exist (also catchable as ``FileNotFoundError``)."""


def _agent_error(payload: bytes, what: str) -> AgentError:
    err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
    text = payload[4:].decode("utf-8", "replace")
    cls = GuestFileNotFoundError if err == errno_mod.ENOENT else AgentError
    return cls(f"{what}: {text}" if what else text, err)


def _enc(s: str, what: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValidationError(f"{what} contains a NUL byte", field=what)
    return b


class _Stream:
    """State of one request; frames arrive on the reader thread."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: SmolVMError | None = None
        self.reply = b""
        self.activity = time.monotonic()

    def on_frame(self, op: int, flags: int, payload: bytes) -> bool:
        """Handle a frame; return True when the stream is finished."""
        if op == OP_ERROR:
            self.error = _agent_error(payload, "")
        self.reply = payload
        return True

    def fail(self, exc: SmolVMError) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()

    def wait(self, idle_timeout: float, what: str) -> None:
        """Wait until done; time out after ``idle_timeout`` seconds without any frame."""
        while not self.done.wait(min(idle_timeout, 0.5)):
            if time.monotonic() - self.activity > idle_timeout:
                raise OperationTimeoutError(f"{what}: no answer from the guest agent within {idle_timeout:g} s", idle_timeout)
        if self.error is not None:
            raise self.error


class _ExecStream(_Stream):
    def __init__(self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None) -> None:
        super().__init__()
        self.started = threading.Event()
        self.pid: int | None = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.callbacks = {OP_STDOUT: on_stdout, OP_STDERR: on_stderr}
        self.callback_error: BaseException | None = None
        self.exit_code = -1
        self.timed_out = False

    def on_frame(self, op: int, flags: int, payload: bytes) -> bool:
        if op in (OP_STDOUT, OP_STDERR):
            (self.out if op == OP_STDOUT else self.err).append(payload)
            cb = self.callbacks[op]
            if cb is not None and self.callback_error is None:
                try:
                    cb(payload)
                except BaseException as exc:  # re-raised to the caller after the command ends
                    log.warning("output callback raised %r", exc)
                    self.callback_error = exc
            return False
        if op == OP_STARTED:
            self.pid = struct.unpack_from("<I", payload)[0]
            self.started.set()
            return False
        if op == OP_EXIT:
            code, xflags, _sig = struct.unpack_from("<iII", payload)
            self.exit_code, self.timed_out = code, bool(xflags & XF_TIMED_OUT)
        elif op == OP_ERROR:
            if self.pid is not None:  # e.g. stdin overflow: the command itself goes on
                log.warning("guest agent: %s", _agent_error(payload, ""))
                return False
            self.error = _agent_error(payload, "the guest agent could not start the command")
        self.started.set()
        return True

    def fail(self, exc: SmolVMError) -> None:
        super().fail(exc)
        self.started.set()


class _ReadStream(_Stream):
    def __init__(self, sink: Callable[[bytes], None], path: str) -> None:
        super().__init__()
        self.sink, self.path, self.mode = sink, path, 0o644

    def on_frame(self, op: int, flags: int, payload: bytes) -> bool:
        if op == OP_FILE_INFO:
            self.mode = struct.unpack_from("<I", payload)[0]
            return False
        if op == OP_FILE_DATA:
            try:
                self.sink(payload)
            except OSError as exc:
                self.error = TransportError(f"download {self.path}: writing locally failed: {exc}")
                return True
            return False
        if op == OP_ERROR:
            self.error = _agent_error(payload, "")
        return True


class _Conn:
    """One connected, HELLO'd socket plus its reader thread."""

    def __init__(self, sock: socket.socket, pending: bytes) -> None:
        self.sock = sock
        self.streams: dict[int, _Stream] = {}
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.next_sid = 1
        self.dead: SmolVMError | None = None
        self.reader = threading.Thread(target=self._read_loop, args=(pending,), name="smolvm-agent-reader", daemon=True)
        self.reader.start()

    def open_stream(self, stream: _Stream) -> int:
        with self.lock:
            if self.dead is not None:
                raise TransportError(self.dead.message)
            sid = self.next_sid
            self.next_sid = sid % 0xFFFFFFFF + 1
            self.streams[sid] = stream
            return sid

    def drop_stream(self, sid: int) -> None:
        with self.lock:
            self.streams.pop(sid, None)

    def send(self, op: int, sid: int, payload: bytes = b"", flags: int = 0) -> None:
        data = HDR.pack(b"SV", op, flags, sid, len(payload)) + payload
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            self.kill(TransportError(f"sending to the guest agent failed: {exc}"))
            raise TransportError(self.dead.message if self.dead else str(exc)) from None

    def _read_loop(self, buf: bytes) -> None:
        data = bytearray(buf)
        try:
            while True:
                off = 0
                while len(data) - off >= HDR.size:
                    magic, op, flags, sid, n = HDR.unpack_from(data, off)
                    if magic != b"SV":
                        raise TransportError("corrupt frame from the guest agent")
                    if len(data) - off < HDR.size + n:
                        break
                    payload = bytes(data[off + HDR.size : off + HDR.size + n])
                    off += HDR.size + n
                    self._dispatch(op, flags, sid, payload)
                del data[:off]
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise TransportError("the guest agent closed the connection")
                data += chunk
        except SmolVMError as exc:
            self.kill(exc)
        except OSError as exc:
            self.kill(TransportError(f"guest agent connection failed: {exc}"))

    def _dispatch(self, op: int, flags: int, sid: int, payload: bytes) -> None:
        with self.lock:
            stream = self.streams.get(sid)
        if stream is None:
            return  # a stale HELLO reply or a stream the caller gave up on
        stream.activity = time.monotonic()
        if stream.on_frame(op, flags, payload):
            self.drop_stream(sid)
            stream.done.set()

    def kill(self, exc: SmolVMError) -> None:
        """Mark the connection dead and fail every pending request with ``exc``."""
        with self.lock:
            if self.dead is None:
                self.dead = exc
            streams, self.streams = list(self.streams.values()), {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for s in streams:
            s.fail(exc)


class AgentProcessHandle(ProcessHandle):
    """A command started with :meth:`AgentTransport.spawn`."""

    def __init__(self, conn: _Conn, sid: int, stream: _ExecStream, req: ExecRequest, start: float) -> None:
        self._conn, self._sid, self._s, self._req, self._start = conn, sid, stream, req, start
        self.pid = stream.pid
        self._duration: float | None = None

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the command ends (``timeout`` seconds, None = forever).

        Raises ``OperationTimeoutError`` if it is still running then (it keeps running), or
        if the agent killed it because it exceeded the request's own timeout."""
        if not self._s.done.wait(timeout):
            raise OperationTimeoutError(f"process {self.pid} still running after {timeout:g} s", timeout)
        if self._duration is None:
            self._duration = time.monotonic() - self._start
        return _result(self._s, self._req, self._duration)

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` to the command's process group in the guest."""
        if not self._s.done.is_set():
            try:
                self._conn.send(OP_KILL, self._sid, struct.pack("<I", signal))
            except TransportError:
                pass  # connection gone: the agent already killed the command

    def is_running(self) -> bool:
        return not self._s.done.is_set()

    @property
    def stdout(self) -> bytes:
        return b"".join(list(self._s.out))

    @property
    def stderr(self) -> bytes:
        return b"".join(list(self._s.err))


def _result(s: _ExecStream, req: ExecRequest, duration: float) -> CommandResult:
    if s.error is not None:
        raise s.error
    out, err = b"".join(s.out), b"".join(s.err)
    if s.timed_out:
        raise OperationTimeoutError(
            f"command timed out after {req.timeout:g} s and was killed: {req.command[:200]!r}",
            req.timeout,
            {"stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace")},
        )
    if s.callback_error is not None:
        raise s.callback_error
    return CommandResult.from_bytes(s.exit_code, out, err, duration)


class AgentTransport(Transport):
    """Command channel through the SmolVM guest agent.

    Args:
        socket_path: host UNIX socket: QEMU's virtio-serial chardev, or Firecracker's vsock
            UDS (then give ``vsock_port``).
        connect_timeout: seconds to connect and get the agent's HELLO.
        shell_path: shell that runs commands (``argv[0]``); the guest's busybox by default.
        vsock_port: Firecracker only: send ``CONNECT <port>`` first (the agent uses 52).
        op_timeout: seconds of silence after which a file transfer or control op fails.

    ``close()`` releases the connection; a later call reconnects.
    """

    name = "agent"

    def __init__(
        self,
        socket_path: Path,
        *,
        connect_timeout: float = 10.0,
        shell_path: str = GUEST_SHELL,
        vsock_port: int | None = None,
        op_timeout: float = 60.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout
        self.shell_path = shell_path
        self.vsock_port = vsock_port
        self.op_timeout = op_timeout
        self._conn: _Conn | None = None
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------
    def _get_conn(self, timeout: float | None = None) -> _Conn:
        with self._lock:
            if self._conn is None or self._conn.dead is not None:
                self._conn = self._connect(self.connect_timeout if timeout is None else timeout)
            return self._conn

    def _unavailable(self, why: str) -> CommandExecutionUnavailableError:
        return CommandExecutionUnavailableError(
            f"guest agent at {self.socket_path} is not reachable: {why}",
            remediation="Check that the VM is running (`smolvm list`) and its image has the guest "
            "agent (rebuild the image with musl-tools installed); otherwise use comm_channel='ssh'.",
        )

    def _connect(self, timeout: float) -> _Conn:
        deadline = time.monotonic() + timeout
        if not self.socket_path.exists():
            raise self._unavailable("the socket does not exist (VM not started or already stopped)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(timeout, 0.01))
            sock.connect(str(self.socket_path))
            pending = b""
            if self.vsock_port is not None:
                pending = self._vsock_connect(sock, deadline)
            pending = self._handshake(sock, deadline, pending)
            sock.settimeout(None)
        except (TimeoutError, socket.timeout):
            sock.close()
            raise self._unavailable(f"no HELLO from the agent within {timeout:g} s") from None
        except OSError as exc:
            sock.close()
            raise self._unavailable(str(exc)) from None
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, pending)

    def _vsock_connect(self, sock: socket.socket, deadline: float) -> bytes:
        sock.sendall(f"CONNECT {self.vsock_port}\n".encode())
        buf = b""
        while b"\n" not in buf:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(256)
            if not chunk:
                raise OSError("vsock proxy closed the connection (is the agent listening on port "
                              f"{self.vsock_port}?)")
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        if not line.startswith(b"OK "):
            raise OSError(f"vsock proxy answered {line[:80]!r}")
        return rest

    @staticmethod
    def _handshake(sock: socket.socket, deadline: float, buf: bytes) -> bytes:
        """SYNC + HELLO, retried once after 1 s with padding; return bytes read past the reply."""
        nonce = os.urandom(8)
        hello = SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, 12) + struct.pack("<I", PROTO_VERSION) + nonce
        sock.sendall(hello)
        retry_at = time.monotonic() + 1.0
        while True:
            i = buf.find(SYNC_MAGIC)
            if i > 0:
                buf, i = buf[i:], 0
            if i >= 0 and len(buf) >= i + len(SYNC_MAGIC) + HDR.size:
                j = i + len(SYNC_MAGIC)
                magic, op, _f, _sid, n = HDR.unpack_from(buf, j)
                if len(buf) < j + HDR.size + n and magic == b"SV" and n < 4096:
                    pass  # wait for the rest of the reply
                elif magic == b"SV" and op == OP_HELLO and buf[j + HDR.size + 4 : j + HDR.size + 12] == nonce:
                    version = struct.unpack_from("<I", buf, j + HDR.size)[0]
                    if version != PROTO_VERSION:
                        raise TransportError(f"guest agent speaks protocol {version}, expected {PROTO_VERSION}")
                    return buf[j + HDR.size + n :]
                else:
                    buf = buf[i + 1 :]  # stale output or an old reply: keep scanning
                    continue
            elif i < 0:
                buf = buf[-(len(SYNC_MAGIC) - 1) :]
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            if retry_at and now >= retry_at:
                # The agent may be inside a frame of a host that died; only the newest nonce counts.
                nonce = os.urandom(8)
                hello = SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, 12) + struct.pack("<I", PROTO_VERSION) + nonce
                sock.settimeout(max(deadline - now, 0.01))
                sock.sendall(bytes(_PADDING) + hello)
                retry_at = 0.0
            wake = min(deadline, retry_at) if retry_at else deadline
            sock.settimeout(max(wake - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            if not chunk:
                raise OSError("the agent socket closed during the handshake")
            buf += chunk

    def wait_ready(self, timeout: float) -> None:
        """Block until the agent answers a PING (``timeout`` in seconds)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OperationTimeoutError(f"guest agent not ready after {timeout:g} s: {last}", timeout)
            try:
                self._get_conn(timeout=left)
                self.ping(timeout=max(left, 0.1))
                return
            except (CommandExecutionUnavailableError, TransportError, OperationTimeoutError) as exc:
                last = exc
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        """Close the connection (idempotent). Pending calls fail with ``TransportError``."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.kill(TransportError("agent transport closed"))
            conn.sock.close()
            if conn.reader is not threading.current_thread():
                conn.reader.join(timeout=5)

    # -- commands -------------------------------------------------------------------------
    def _start(self, req: ExecRequest, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None):
        argv = [self.shell_path, *req.argv[1:]]
        env = [f"{k}={v}" for k, v in req.env.items()]
        for k in req.env:
            if not k or "=" in k:
                raise ValidationError(f"invalid environment variable name {k!r}", field="env")
        timeout_ms = 0 if req.timeout is None else max(1, math.ceil(req.timeout * 1000))
        flags = EXEC_STDIN if req.stdin is not None else 0
        parts = [struct.pack("<IIHH", min(timeout_ms, 0xFFFFFFFF), flags, len(argv), len(env))]
        parts += [_enc(s, what) + b"\0" for s, what in [(req.cwd or "", "cwd")] + [(a, "command") for a in argv] + [(e, "env") for e in env]]
        payload = b"".join(parts)
        if len(payload) > MAX_PAYLOAD or len(env) > 4096:
            raise ValidationError(f"command, cwd and env together exceed {MAX_PAYLOAD} bytes", field="command")
        conn = self._get_conn()
        stream = _ExecStream(on_stdout, on_stderr)
        sid = conn.open_stream(stream)
        start = time.monotonic()
        conn.send(OP_EXEC, sid, payload)
        if req.stdin is not None:
            data = memoryview(req.stdin)
            for off in range(0, len(data), CHUNK):
                conn.send(OP_STDIN, sid, bytes(data[off : off + CHUNK]))
            conn.send(OP_STDIN, sid, b"", FLAG_EOF)
        return conn, sid, stream, start

    def exec(
        self,
        req: ExecRequest,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        """Run ``req`` to completion; output chunks go to the callbacks as they arrive.

        The agent enforces ``req.timeout`` (seconds) by SIGKILLing the command's process
        group; this raises ``OperationTimeoutError`` (partial output in ``.details``)."""
        conn, sid, stream, start = self._start(req, on_stdout, on_stderr)
        limit = None if req.timeout is None else req.timeout + _TIMEOUT_GRACE
        if not stream.done.wait(limit):
            # The agent should have killed it already; do it ourselves and give up.
            try:
                conn.send(OP_KILL, sid, struct.pack("<I", 9))
            except TransportError:
                pass
            conn.drop_stream(sid)
            raise OperationTimeoutError(
                f"command timed out after {req.timeout:g} s (the guest agent did not report it): "
                f"{req.command[:200]!r}",
                req.timeout,
            )
        return _result(stream, req, time.monotonic() - start)

    def spawn(
        self,
        req: ExecRequest,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AgentProcessHandle:
        """Start ``req`` in the background; returns once the guest process exists.

        ``req.timeout`` (seconds) still limits its lifetime: pass ``timeout=None`` for a
        long-running server."""
        conn, sid, stream, start = self._start(req, on_stdout, on_stderr)
        if not stream.started.wait(self.op_timeout):
            conn.drop_stream(sid)
            raise OperationTimeoutError(f"guest agent did not start the command within {self.op_timeout:g} s", self.op_timeout)
        if stream.error is not None and stream.pid is None:
            raise stream.error
        return AgentProcessHandle(conn, sid, stream, req, start)

    # -- files ----------------------------------------------------------------------------
    def _write(self, path: str, chunks: Iterable[bytes], mode: int, *, fsync: bool, make_parents: bool) -> None:
        payload = struct.pack("<II", mode & 0o7777, (WF_FSYNC if fsync else 0) | (WF_MKDIRS if make_parents else 0))
        payload += _enc(path, "path")
        conn = self._get_conn()
        stream = _Stream()
        sid = conn.open_stream(stream)
        try:
            conn.send(OP_WRITE_FILE, sid, payload)
            for chunk in chunks:
                if stream.done.is_set():
                    break  # the agent already failed the upload: stop sending
                for off in range(0, len(chunk), CHUNK):
                    conn.send(OP_FILE_DATA, sid, bytes(chunk[off : off + CHUNK]))
            conn.send(OP_FILE_END, sid)
            stream.wait(self.op_timeout, f"write {path}")
        except BaseException:
            conn.drop_stream(sid)
            if not stream.done.is_set():
                try:
                    conn.send(OP_KILL, sid)  # deletes the partial temporary file in the guest
                except TransportError:
                    pass
            raise

    def _read(self, path: str, sink: Callable[[bytes], None]) -> int:
        conn = self._get_conn()
        stream = _ReadStream(sink, path)
        sid = conn.open_stream(stream)
        try:
            conn.send(OP_READ_FILE, sid, _enc(path, "path"))
            stream.wait(self.op_timeout, f"read {path}")
        except BaseException:
            conn.drop_stream(sid)
            if not stream.done.is_set():
                try:
                    conn.send(OP_KILL, sid)
                except TransportError:
                    pass
            raise
        return stream.mode

    def write_file(self, path: str, data: bytes, mode: int = 0o644, *, fsync: bool = False, make_parents: bool = False) -> None:
        """Write ``data`` to guest ``path`` atomically (temporary file + rename) with ``mode``."""
        self._write(path, [memoryview(data)], mode, fsync=fsync, make_parents=make_parents)

    def read_file(self, path: str) -> bytes:
        """Return the contents of guest ``path`` (``GuestFileNotFoundError`` if missing)."""
        parts: list[bytes] = []
        self._read(path, parts.append)
        return b"".join(parts)

    def upload(self, local: Path, remote: str, mode: int | None = None) -> None:
        """Stream host file ``local`` to guest ``remote``; keeps its mode unless ``mode`` given."""
        local = Path(local)
        with open(local, "rb") as f:
            if mode is None:
                mode = os.fstat(f.fileno()).st_mode & 0o7777
            self._write(remote, iter(lambda: f.read(1 << 20), b""), mode, fsync=False, make_parents=False)

    def download(self, remote: str, local: Path) -> None:
        """Stream guest ``remote`` to host ``local`` (written atomically, guest mode kept)."""
        local = Path(local)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                mode = self._read(remote, f.write)
            os.chmod(tmp, mode)
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- control --------------------------------------------------------------------------
    def _call(self, op: int, payload: bytes, what: str, timeout: float | None = None) -> bytes:
        conn = self._get_conn()
        stream = _Stream()
        sid = conn.open_stream(stream)
        try:
            conn.send(op, sid, payload)
            stream.wait(self.op_timeout if timeout is None else timeout, what)
        finally:
            conn.drop_stream(sid)
        return stream.reply

    def ping(self, timeout: float | None = None) -> float:
        """Round trip to the agent; returns it in seconds."""
        t0 = time.perf_counter()
        self._call(OP_PING, b"ping", "ping", timeout)
        return time.perf_counter() - t0

    def sync_time(self) -> float:
        """Set the guest clock to the host's; returns the correction applied, in seconds."""
        reply = self._call(OP_SET_TIME, struct.pack("<q", time.time_ns()), "set time")
        return struct.unpack_from("<q", reply)[0] / 1e9 if len(reply) >= 8 else 0.0

    def add_entropy(self, data: bytes) -> None:
        """Mix ``data`` into the guest kernel's RNG and credit it (do it after a restore)."""
        for off in range(0, max(len(data), 1), 4096):
            self._call(OP_ADD_ENTROPY, bytes(data[off : off + 4096]), "add entropy")

    def set_hostname(self, name: str) -> None:
        """Set the guest's kernel hostname (1-64 bytes)."""
        self._call(OP_SET_HOSTNAME, _enc(name, "hostname"), "set hostname")

    def shutdown(self) -> None:
        """Ask the agent to power the guest off (it kills all processes and syncs first)."""
        try:
            self._call(OP_SHUTDOWN, b"", "shutdown", timeout=min(self.op_timeout, 10.0))
        except TransportError:
            pass  # the connection may drop before the OK arrives
        self.close()


__all__ = ["AgentTransport", "AgentProcessHandle", "AgentError", "GuestFileNotFoundError"]
