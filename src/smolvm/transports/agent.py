"""Host side of the guest-agent channel (wire format: ``src/smolvm/guest/agent.h``).

One connection per transport, opened lazily and reopened after it drops. A background
reader thread demultiplexes frames to per-request streams, so any number of threads may
run commands and transfers concurrently over one socket. Output callbacks run on that
reader thread: they must be quick and must not call back into the transport and wait.

Sessions: every connection starts with ``SYNC_MAGIC`` + HELLO(nonce). The guest end of a
virtio-serial port outlives host connections, so the agent treats HELLO as "new host":
commands the previous connection left running are killed. Background processes started
by a command (``server &`` with its output redirected) are not affected.

Ports: QEMU's chardev socket serves one host client at a time, so a QEMU VM has several
agent ports (``backends.base.agent_sockets``). A transport takes the first free one: it
holds a non-blocking ``flock`` on the port's ``<socket>.lock`` for as long as its
connection is open (a crashed process releases it), so no other process's HELLO ever
ends its session. Firecracker's vsock UDS accepts any number of clients: no locking.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from smolvm.backends.base import AGENT_PORTS, agent_lock_path
from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    OperationTimeoutError,
    TransportError,
    ValidationError,
)
from smolvm.locks import try_lock
from smolvm.transports.agent_handles import AgentProcessHandle, AgentWatchHandle, abandon, result
from smolvm.transports.agent_proto import (
    CHUNK,
    EXEC_DETACH,
    EXEC_HOST,
    EXEC_LIMITS,
    EXEC_LOWPRIO,
    EXEC_PTY,
    EXEC_STDIN,
    FLAG_EOF,
    MAX_PAYLOAD,
    OP_ADD_ENTROPY,
    OP_EXEC,
    OP_FILE_DATA,
    OP_FILE_END,
    OP_PING,
    OP_READ_FILE,
    OP_SET_HOSTNAME,
    OP_SET_TIME,
    OP_SHUTDOWN,
    OP_STDIN,
    OP_WATCH,
    OP_WRITE_FILE,
    WATCH_RECURSIVE,
    WF_FSYNC,
    WF_MKDIRS,
    AgentError,
    Conn,
    ExecStream,
    GuestFileNotFoundError,
    ReadStream,
    Stream,
    WatchStream,
    encode_fields,
    handshake,
)
from smolvm.transports.base import (
    GUEST_SHELL,
    Counter,
    ExecRequest,
    OutputCallback,
    Transport,
    check_size,
    host_mode,
)
from smolvm.types import CommandResult

#: Seconds the host waits beyond a command's timeout for the agent to report the kill.
_TIMEOUT_GRACE = 1.5


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class AgentTransport(Transport):
    """Command channel through the SmolVM guest agent.

    Args:
        socket_path: host UNIX socket: QEMU's virtio-serial chardev, or Firecracker's vsock
            UDS (then give ``vsock_port``); or a list of them, the VM's agent ports
            (``backends.base.agent_sockets``): the first free one is used.
        connect_timeout: seconds to connect and get the agent's HELLO (including waiting
            for a free port while other processes hold all of them).
        shell_path: shell that runs commands (``argv[0]``); the guest's busybox by default.
        vsock_port: Firecracker only: send ``CONNECT <port>`` first (the agent uses 52).
        op_timeout: seconds of silence after which a file transfer or control op fails.
        exclusive: take a port's lock file before connecting (default: unless
            ``vsock_port``; a socket that accepts many clients needs none).

    ``close()`` releases the connection (and its port); a later call reconnects.
    """

    name = "agent"

    def __init__(
        self,
        socket_path: Path | str | Sequence[Path | str],
        *,
        connect_timeout: float = 10.0,
        shell_path: str = GUEST_SHELL,
        vsock_port: int | None = None,
        op_timeout: float = 60.0,
        exclusive: bool | None = None,
    ) -> None:
        if isinstance(socket_path, (str, os.PathLike)):
            self.socket_paths = [Path(socket_path)]
        else:
            self.socket_paths = [Path(p) for p in socket_path]
        if not self.socket_paths:
            raise ValidationError("AgentTransport needs at least one socket path", field="socket_path")
        #: Port 0 (the only one for a single path).
        self.socket_path = self.socket_paths[0]
        self.connect_timeout = connect_timeout
        self.shell_path = shell_path
        self.vsock_port = vsock_port
        self.op_timeout = op_timeout
        self.exclusive = vsock_port is None if exclusive is None else exclusive
        self._conn: Conn | None = None
        self._port_lock: int | None = None  # fd holding flock on the connected port's lock file
        #: The socket of the current (or last) connection.
        self.connected_path: Path | None = None
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------
    def _get_conn(self, timeout: float | None = None) -> Conn:
        with self._lock:
            if self._conn is None or self._conn.dead is not None:
                if self._conn is not None:
                    self._conn.sock.close()
                    self._conn = None
                self._release_port()
                self._conn = self._connect(self.connect_timeout if timeout is None else timeout)
                self.connects += 1
            return self._conn

    def _release_port(self) -> None:
        fd, self._port_lock = self._port_lock, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _try_lock(self, sock: Path) -> tuple[bool, int | None]:
        """Lock ``sock``'s port: (True, fd) when taken, (False, None) when another process
        holds it, (True, None) when no lock file can be made (e.g. read-only directory)."""
        path = agent_lock_path(sock)
        try:
            fd = try_lock(path)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return True, None
            raise self._unavailable(f"cannot open the port's lock file {path}: {exc}") from None
        return fd is not None, fd

    def _pick_port(self, deadline: float, timeout: float) -> tuple[Path, int | None]:
        """The first socket whose port is free (its lock taken), waiting until ``deadline``."""
        while True:
            present = [p for p in self.socket_paths if p.exists()]
            if not present:
                raise self._unavailable("the socket does not exist (VM not started or already stopped)")
            if not self.exclusive:
                return present[0], None
            for p in present:
                took, fd = self._try_lock(p)
                if took:
                    return p, fd
            if time.monotonic() >= deadline:
                raise CommandExecutionUnavailableError(
                    f"all {len(present)} guest-agent channels of {self.socket_path} are held by other "
                    f"processes (waited {timeout:g} s for one to close)",
                    remediation=f"at most {len(present)} process{'es' if len(present) != 1 else ''} can "
                    "hold a command channel to one VM at once; close other SmolVM handles or use "
                    "comm_channel='ssh'"
                    + (
                        ""
                        if len(present) > 1
                        else f" (VMs started by this SmolVM version have {AGENT_PORTS})"
                    ),
                )
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.001)))

    def _unavailable(self, why: str) -> CommandExecutionUnavailableError:
        return CommandExecutionUnavailableError(
            f"guest agent at {self.socket_path} is not reachable: {why}",
            remediation="Check that the VM is running (`smolvm list`) and its image has the guest "
            "agent (rebuild the image with musl-tools installed); otherwise use comm_channel='ssh'.",
        )

    def _connect(self, timeout: float) -> Conn:
        deadline = time.monotonic() + timeout
        path, lock_fd = self._pick_port(deadline, timeout)
        # Time spent waiting for a free port does not starve the handshake.
        deadline = max(deadline, time.monotonic() + min(timeout, 2.0))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.connect(str(path))
            pending = b""
            if self.vsock_port is not None:
                pending = self._vsock_connect(sock, deadline)
            pending = handshake(sock, deadline, pending)
            sock.settimeout(None)
        except TimeoutError:
            sock.close()
            _close_fd(lock_fd)
            raise self._unavailable(
                f"no HELLO from the agent on {path.name} within {timeout:g} s (guest still booting, no "
                "agent in the image, or a process without the port lock holds the channel: QEMU serves "
                "one client per port)"
            ) from None
        except OSError as exc:
            sock.close()
            _close_fd(lock_fd)
            raise self._unavailable(str(exc)) from None
        except BaseException:
            sock.close()
            _close_fd(lock_fd)
            raise
        self._port_lock, self.connected_path = lock_fd, path
        return Conn(sock, pending)

    def _vsock_connect(self, sock: socket.socket, deadline: float) -> bytes:
        sock.sendall(f"CONNECT {self.vsock_port}\n".encode())
        buf = b""
        while b"\n" not in buf:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = sock.recv(256)
            if not chunk:
                raise OSError(
                    f"vsock proxy closed the connection (is the agent listening on port {self.vsock_port}?)"
                )
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        if not line.startswith(b"OK "):
            raise OSError(f"vsock proxy answered {line[:80]!r}")
        return rest

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
        """Close the connection and free its port (idempotent). Pending calls fail with
        ``TransportError``."""
        with self._lock:
            conn, self._conn = self._conn, None
            lock_fd, self._port_lock = self._port_lock, None
        if conn is not None:
            conn.kill(TransportError("agent transport closed"))
            conn.sock.close()
        _close_fd(lock_fd)  # after the socket: the next holder finds the port closed
        if conn is not None and conn.reader is not threading.current_thread():
            conn.reader.join(timeout=5)

    # -- commands -------------------------------------------------------------------------
    def _start(
        self, req: ExecRequest, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
    ) -> tuple[Conn, int, ExecStream, float]:
        argv = [self.shell_path, *req.argv[1:]]
        env = [f"{k}={v}" for k, v in req.env.items()]
        for k in req.env:
            if not k or "=" in k:
                raise ValidationError(f"invalid environment variable name {k!r}", field="env")
        timeout_ms = 0 if req.timeout is None else max(1, math.ceil(req.timeout * 1000))
        flags = EXEC_STDIN if req.stdin is not None else 0
        flags |= EXEC_DETACH if req.detach else 0
        flags |= EXEC_LIMITS if req.limits is not None else 0
        flags |= EXEC_HOST if req.host_work else 0
        flags |= EXEC_PTY if req.pty else 0
        flags |= EXEC_LOWPRIO if req.low_priority else 0
        parts = [struct.pack("<IIHH", min(timeout_ms, 0xFFFFFFFF), flags, len(argv), len(env))]
        fields = [(req.cwd or "", "cwd"), *((a, "command") for a in argv), *((e, "env") for e in env)]
        parts += [encode_fields(text, what) + b"\0" for text, what in fields]
        if req.limits is not None:  # 0 = the guest's default
            lim = req.limits
            parts.append(struct.pack("<III", lim.pids or 0, lim.memory_mib or 0, lim.cpu_weight or 0))
        if req.pty:
            check_size(*req.pty)
            parts.append(struct.pack("<HH", *req.pty))
        payload = b"".join(parts)
        if len(payload) > MAX_PAYLOAD or len(env) > 4096:
            raise ValidationError(
                f"command, cwd and env together exceed {MAX_PAYLOAD} bytes", field="command"
            )
        conn = self._get_conn()
        keep = 0 if not req.capture else req.max_output_bytes
        stream = ExecStream(on_stdout, on_stderr, keep=keep)
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
        deadline = None if limit is None else time.monotonic() + limit
        try:
            finished = False
            while not finished and not stream.abort.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                finished = stream.done.wait(0.05 if left is None else min(0.05, left))
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the command running
            abandon(conn, sid)
            raise
        if not finished and stream.callback_error is not None:  # an output callback raised
            abandon(conn, sid)
            raise stream.callback_error
        if not finished:
            # The agent should have killed it already; do it ourselves and give up.
            abandon(conn, sid)
            raise OperationTimeoutError(
                f"command timed out after {req.timeout:g} s (the guest agent did not report it): "
                f"{req.command[:200]!r}",
                req.timeout,
            )
        return result(stream, req, stream.activity - start)

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
            raise OperationTimeoutError(
                f"guest agent did not start the command within {self.op_timeout:g} s", self.op_timeout
            )
        if stream.error is not None and stream.pid is None:
            raise stream.error
        return AgentProcessHandle(conn, sid, stream, req, start)

    def watch(
        self, path: str, *, recursive: bool = False, on_event: Callable[[str, str], object] | None = None
    ) -> AgentWatchHandle:
        """Watch guest directory ``path`` (inotify in the agent); returns once watching, so
        every change after this call is reported. ``on_event(kind, path)`` runs on the
        reader thread (keep it quick)."""
        payload = struct.pack("<I", WATCH_RECURSIVE if recursive else 0) + encode_fields(path, "path")
        conn = self._get_conn()
        stream = WatchStream(on_event)
        sid = conn.open_stream(stream)
        conn.send(OP_WATCH, sid, payload)
        if not stream.started.wait(self.op_timeout):
            abandon(conn, sid)
            raise OperationTimeoutError(
                f"watch {path}: no answer within {self.op_timeout:g} s", self.op_timeout
            )
        if not stream.ok:
            raise stream.error or TransportError(f"watch {path}: the guest agent refused it")
        return AgentWatchHandle(conn, sid, stream)

    # -- files ----------------------------------------------------------------------------
    def _write(
        self, path: str, chunks: Iterable[bytes | memoryview], mode: int, *, fsync: bool, make_parents: bool
    ) -> None:
        payload = struct.pack(
            "<II", mode & 0o7777, (WF_FSYNC if fsync else 0) | (WF_MKDIRS if make_parents else 0)
        )
        payload += encode_fields(path, "path")
        conn = self._get_conn()
        stream = Stream()
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
            if stream.done.is_set():
                conn.drop_stream(sid)
            else:
                abandon(conn, sid)  # the agent deletes the partial temporary file
            raise

    def _read(self, path: str, sink: Callable[[bytes], object]) -> int:
        conn = self._get_conn()
        stream = ReadStream(sink, path)
        sid = conn.open_stream(stream)
        try:
            conn.send(OP_READ_FILE, sid, encode_fields(path, "path"))
            stream.wait(self.op_timeout, f"read {path}")
        except BaseException:
            if stream.done.is_set():
                conn.drop_stream(sid)
            else:
                abandon(conn, sid)
            raise
        return stream.mode

    def write_file(
        self, path: str, data: bytes, mode: int = 0o644, *, fsync: bool = False, make_parents: bool = False
    ) -> None:
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

    def download(self, remote: str, local: Path, max_bytes: int | None = None) -> None:
        """Stream guest ``remote`` to host ``local`` (written atomically, without following a
        symlink at ``local``; the guest's mode without setuid/setgid/sticky or group/world
        write bits, see ``host_mode``; at most ``max_bytes``)."""
        local = Path(local)
        count = Counter(remote, max_bytes)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as f:

                def sink(b: bytes) -> None:
                    count.add(len(b))
                    f.write(b)

                mode = self._read(remote, sink)
            os.chmod(tmp, host_mode(mode))
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- control --------------------------------------------------------------------------
    def _call(self, op: int, payload: bytes, what: str, timeout: float | None = None) -> bytes:
        conn = self._get_conn()
        stream = Stream()
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
        self._call(OP_SET_HOSTNAME, encode_fields(name, "hostname"), "set hostname")

    def shutdown(self) -> None:
        """Ask the agent to power the guest off (it kills all processes and syncs first)."""
        try:
            self._call(OP_SHUTDOWN, b"", "shutdown", timeout=min(self.op_timeout, 10.0))
        except TransportError:
            pass  # the connection may drop before the OK arrives
        self.close()


__all__ = ["AgentTransport", "AgentProcessHandle", "AgentError", "GuestFileNotFoundError"]
