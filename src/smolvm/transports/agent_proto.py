"""Wire format and connection machinery of the guest-agent channel (host side).

The frame layout and ops are defined in ``src/smolvm/guest/agent.h``; keep both in step.
"""

from __future__ import annotations

import collections
import errno as errno_mod
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from smolvm.exceptions import (
    AgentError,
    GuestFileNotFoundError,
    OperationTimeoutError,
    SmolVMError,
    TransportError,
    ValidationError,
)
from smolvm.transports.base import OutputCallback

log = logging.getLogger("smolvm.transports.agent")

PROTO_VERSION = 1
SYNC_MAGIC = b"\x00SMOLVM\x01SYNC\xa5\x5a\xc3\x3c"
HDR = struct.Struct("<2sBBII")  # b"SV", op, flags, stream id, payload length
MAX_PAYLOAD = 256 * 1024  # the agent's limit for host -> agent frames
#: Largest agent -> host frame accepted (the agent sends data in CHUNK frames; replies are
#: small). A bigger length is a broken or hostile guest: the connection is dropped.
MAX_IN_PAYLOAD = 1024 * 1024
CHUNK = 64 * 1024
# After a host died mid-frame the agent may still expect that frame's payload: this many
# zero bytes complete any such frame and force the agent to look for SYNC_MAGIC again.
_PADDING = MAX_PAYLOAD + 64
#: Seconds without a HELLO reply before the handshake is retried with padding.
_RETRY_AFTER = 0.5

(OP_HELLO, OP_PING, OP_EXEC, OP_STDIN, OP_KILL, OP_RESIZE) = (0x01, 0x02, 0x10, 0x11, 0x12, 0x13)
(OP_WRITE_FILE, OP_FILE_DATA, OP_FILE_END, OP_READ_FILE, OP_FILE_INFO) = (0x20, 0x21, 0x22, 0x23, 0x24)
OP_WATCH, OP_WATCH_EVENT = 0x25, 0x44
(OP_SET_TIME, OP_ADD_ENTROPY, OP_SET_HOSTNAME, OP_SHUTDOWN) = (0x30, 0x31, 0x32, 0x33)
(OP_STARTED, OP_STDOUT, OP_STDERR, OP_EXIT, OP_OK, OP_ERROR) = (0x40, 0x41, 0x42, 0x43, 0x7E, 0x7F)
FLAG_EOF = 0x01
EXEC_STDIN, EXEC_ENV_REPLACE, EXEC_DETACH, EXEC_LIMITS, EXEC_HOST = 0x01, 0x02, 0x04, 0x08, 0x10
EXEC_PTY, EXEC_LOWPRIO, WATCH_RECURSIVE = 0x20, 0x40, 0x01
#: WATCH_EVENT codes (agent.h EV_*) and the names the API reports.
WATCH_EVENTS = {1: "create", 2: "write", 3: "remove", 4: "rename", 5: "chmod", 6: "overflow"}
#: Events kept for a watch nobody reads; beyond, they are dropped and one "overflow" says so.
WATCH_QUEUE = 10_000
WF_FSYNC, WF_MKDIRS = 0x01, 0x02
XF_TIMED_OUT = 0x01


def _agent_error(payload: bytes, what: str) -> AgentError:
    err = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
    text = payload[4:].decode("utf-8", "replace")
    cls = GuestFileNotFoundError if err == errno_mod.ENOENT else AgentError
    return cls(f"{what}: {text}" if what else text, err)


def encode_fields(s: str, what: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValidationError(f"{what} contains a NUL byte", field=what)
    return b


class Stream:
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
                raise OperationTimeoutError(
                    f"{what}: no answer from the guest agent within {idle_timeout:g} s", idle_timeout
                )
        if self.error is not None:
            raise self.error


class ExecStream(Stream):
    def __init__(
        self,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        *,
        keep: int | None = None,
    ) -> None:
        super().__init__()
        self.started = threading.Event()
        self.pid: int | None = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        #: Bytes kept per stream (None: all); beyond it output only reaches the callbacks.
        self.keep = keep
        self.kept = {OP_STDOUT: 0, OP_STDERR: 0}
        self.truncated = False
        #: Set when an output callback raised: the caller stops the command.
        self.abort = threading.Event()
        self.callbacks = {OP_STDOUT: on_stdout, OP_STDERR: on_stderr}
        self.callback_error: BaseException | None = None
        self.late_error: SmolVMError | None = None
        self.exit_code = -1
        self.timed_out = False

    def on_frame(self, op: int, flags: int, payload: bytes) -> bool:
        if op in (OP_STDOUT, OP_STDERR):
            room = len(payload) if self.keep is None else max(0, self.keep - self.kept[op])
            if room:
                (self.out if op == OP_STDOUT else self.err).append(payload[:room])
                self.kept[op] += min(room, len(payload))
            if room < len(payload):
                self.truncated = True
            cb = self.callbacks[op]
            if cb is not None and self.callback_error is None:
                try:
                    cb(payload)
                except BaseException as exc:  # the caller kills the command and re-raises it
                    log.warning("output callback raised %r; stopping the command", exc)
                    self.callback_error = exc
                    self.abort.set()
            return False
        if op == OP_STARTED:
            self.pid = struct.unpack_from("<I", payload)[0]
            self.started.set()
            return False
        if op == OP_EXIT:
            code, xflags, _sig = struct.unpack_from("<iII", payload)
            self.exit_code, self.timed_out = code, bool(xflags & XF_TIMED_OUT)
        elif op == OP_ERROR:
            if self.pid is not None:  # e.g. stdin overflow: the command goes on, reported at exit
                self.late_error = _agent_error(payload, "guest agent")
                return False
            self.error = _agent_error(payload, "the guest agent could not start the command")
        self.started.set()
        return True

    def fail(self, exc: SmolVMError) -> None:
        super().fail(exc)
        self.started.set()


class ReadStream(Stream):
    def __init__(self, sink: Callable[[bytes], object], path: str) -> None:
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
            except SmolVMError as exc:  # the sink's own limit
                self.error = exc
                return True
            return False
        if op == OP_ERROR:
            self.error = _agent_error(payload, "")
        return True


class WatchStream(Stream):
    """A directory watch: OK once watching, then (event, path) pairs until cancelled."""

    def __init__(self, on_event: Callable[[str, str], object] | None) -> None:
        super().__init__()
        self.started = threading.Event()
        #: The agent confirmed the watch (later errors end it; they do not undo that).
        self.ok = False
        self.on_event = on_event
        self.events: collections.deque[tuple[str, str]] = collections.deque()
        self.cond = threading.Condition()
        self.overflowed = False

    def on_frame(self, op: int, flags: int, payload: bytes) -> bool:
        if op == OP_OK:
            self.ok = True
            self.started.set()
            return False
        if op == OP_WATCH_EVENT:
            if len(payload) > 4 + 4096:  # PATH_MAX: the unread queue stays under ~40 MiB
                raise ValueError("a watched path longer than PATH_MAX")
            kind = WATCH_EVENTS[struct.unpack_from("<I", payload)[0]]  # KeyError: malformed
            path = payload[4:].decode("utf-8", "surrogateescape")
            if "\0" in path:
                raise ValueError("NUL in a watched path")
            self._push(kind, path)
            return False
        if op == OP_ERROR:
            self.error = _agent_error(payload, "")
        self.started.set()
        self.close()
        return True

    def close(self) -> None:
        """No more events: wake every reader."""
        self.done.set()
        with self.cond:
            self.cond.notify_all()

    def _push(self, kind: str, path: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, path)
            except Exception:  # a broken callback must not kill the connection's reader
                log.exception("watch callback raised; event kept in the queue")
        with self.cond:
            if len(self.events) < WATCH_QUEUE:
                self.events.append((kind, path))
            elif not self.overflowed:
                self.overflowed = True
                self.events[-1] = ("overflow", "")
            self.cond.notify_all()

    def fail(self, exc: SmolVMError) -> None:
        super().fail(exc)
        self.started.set()
        self.close()


class Conn:
    """One connected, HELLO'd socket plus its reader thread."""

    def __init__(self, sock: socket.socket, pending: bytes) -> None:
        self.sock = sock
        self.streams: dict[int, Stream] = {}
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.next_sid = 1
        self.dead: SmolVMError | None = None
        self.reader = threading.Thread(
            target=self._read_loop, args=(pending,), name="smolvm-agent-reader", daemon=True
        )
        self.reader.start()

    def open_stream(self, stream: Stream) -> int:
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
                    if n > MAX_IN_PAYLOAD:
                        raise TransportError(
                            f"the guest agent sent a {n}-byte frame (limit {MAX_IN_PAYLOAD}): "
                            "connection dropped"
                        )
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
        except Exception as exc:  # never let the reader die silently: every waiter would hang
            self.kill(TransportError(f"guest agent connection failed: {exc!r}"))

    def _dispatch(self, op: int, flags: int, sid: int, payload: bytes) -> None:
        with self.lock:
            stream = self.streams.get(sid)
        if stream is None:
            return  # a stale HELLO reply or a stream the caller gave up on
        stream.activity = time.monotonic()
        try:
            finished = stream.on_frame(op, flags, payload)
        except (struct.error, ValueError, LookupError, UnicodeDecodeError) as exc:
            # A malformed payload (too short, bad encoding): the guest is broken or hostile.
            raise TransportError(
                f"malformed frame from the guest agent (op 0x{op:02x}, {len(payload)} bytes): {exc}"
            ) from exc
        if finished:
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


def handshake(sock: socket.socket, deadline: float, buf: bytes) -> bytes:
    """SYNC + HELLO, retried once after 1 s with padding; return bytes read past the reply."""
    nonce = os.urandom(8)
    hello = SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, 12) + struct.pack("<I", PROTO_VERSION) + nonce
    sock.sendall(hello)
    retry_at = time.monotonic() + _RETRY_AFTER
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
            hello = (
                SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, 12) + struct.pack("<I", PROTO_VERSION) + nonce
            )
            sock.settimeout(max(deadline - now, 0.01))
            sock.sendall(bytes(_PADDING) + hello)
            retry_at = 0.0
        wake = min(deadline, retry_at) if retry_at else deadline
        sock.settimeout(max(wake - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise OSError("the agent socket closed during the handshake")
        buf += chunk
