"""The host's agent-protocol client against a deliberately malicious agent (an adversary,
not a mock): after a valid handshake it answers a command with hypothesis-generated
frames — short payloads, unknown ops, wrong stream ids, lengths up to 4 GiB, raw garbage —
and then hangs up or goes silent. Every call must return or raise a SmolVMError within its
timeout + 2 s, and no frame may make the host buffer more than the protocol's limit."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolvm.exceptions import SmolVMError, TransportError
from smolvm.transports.agent import AgentTransport
from smolvm.transports.agent_proto import (
    HDR,
    MAX_IN_PAYLOAD,
    OP_ERROR,
    OP_EXEC,
    OP_EXIT,
    OP_FILE_INFO,
    OP_HELLO,
    OP_OK,
    OP_STARTED,
    OP_STDERR,
    OP_STDOUT,
    OP_WATCH,
    OP_WATCH_EVENT,
    PROTO_VERSION,
    SYNC_MAGIC,
    WATCH_QUEUE,
)
from smolvm.transports.base import ExecRequest
from smolvm.types import CommandResult

#: Examples per run (quoted in the closing note); most end in a hang-up, some in silence.
EXAMPLES = 1000
TIMEOUT = 0.1  # seconds, the command's own timeout
OPS = [OP_STARTED, OP_STDOUT, OP_STDERR, OP_EXIT, OP_OK, OP_ERROR, OP_FILE_INFO, OP_HELLO, 0x00, 0xFF]


@st.composite
def frame(draw) -> tuple[int | None, bytes]:
    """(op or None for raw bytes, wire bytes); the stream id is patched in later (-1)."""
    kind = draw(st.sampled_from(["ok", "short", "random", "huge", "raw"]))
    if kind == "raw":
        return None, draw(st.binary(min_size=1, max_size=64))
    op = draw(st.sampled_from(OPS))
    flags = draw(st.integers(0, 255))
    if kind == "ok":
        payload = {
            OP_STARTED: struct.pack("<I", 4242),
            OP_EXIT: struct.pack("<iII", 0, 0, 0),
            OP_FILE_INFO: struct.pack("<IQ", 0o644, 5),
            OP_ERROR: struct.pack("<I", 2) + b"no such thing",
        }.get(op, b"data")
        return op, HDR.pack(b"SV", op, flags, 0, len(payload)) + payload
    if kind == "short":
        payload = draw(st.binary(max_size=3))
        return op, HDR.pack(b"SV", op, flags, 0, len(payload)) + payload
    if kind == "huge":  # claims more than the limit; sends a little of it
        n = draw(st.integers(MAX_IN_PAYLOAD + 1, 2**32 - 1))
        return op, HDR.pack(b"SV", op, flags, 0, n) + b"\0" * draw(st.integers(0, 100))
    payload = draw(st.binary(max_size=200))
    return op, HDR.pack(b"SV", op, flags, 0, len(payload)) + payload


class MaliciousAgent:
    """One connection: a correct handshake, then ``frames`` for the host's first command."""

    def __init__(
        self,
        path: Path,
        frames: list[tuple[int | None, bytes]],
        hang: bool,
        wrong_sid: bool,
        first_op: int = OP_EXEC,
    ) -> None:
        self.path, self.frames, self.hang, self.wrong_sid = path, frames, hang, wrong_sid
        self.first_op = first_op
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def _read_frame(self, conn: socket.socket, buf: bytearray, want_op: int) -> tuple[int, bytes, bytearray]:
        while True:
            i = buf.find(b"SV")
            if i >= 0 and len(buf) >= i + HDR.size:
                _m, op, _f, sid, n = HDR.unpack_from(buf, i)
                if len(buf) >= i + HDR.size + n:
                    payload = bytes(buf[i + HDR.size : i + HDR.size + n])
                    rest = buf[i + HDR.size + n :]
                    if op == want_op:
                        return sid, payload, rest
                    buf = rest
                    continue
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError
            buf += chunk

    def serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        self.srv.close()  # one connection only: a reconnect is refused at once
        with conn:
            try:
                _sid, hello, buf = self._read_frame(conn, bytearray(), OP_HELLO)
                reply = struct.pack("<I", PROTO_VERSION) + hello[4:12]
                conn.sendall(SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, len(reply)) + reply)
                sid, _exec, buf = self._read_frame(conn, buf, self.first_op)
                target = sid + 1 if self.wrong_sid else sid
                for op, data in self.frames:
                    if op is not None:  # patch the stream id into the header
                        data = data[:4] + struct.pack("<I", target) + data[8:]
                    conn.sendall(data)
                if self.hang:
                    while conn.recv(65536):
                        pass
            except OSError:
                pass

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fz")


_seq = iter(range(10**9))


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a dying reader
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    frames=st.lists(frame(), max_size=6),
    hang=st.integers(0, 19).map(lambda x: x == 0),  # 1 in 20 goes silent instead of hanging up
    wrong_sid=st.booleans(),
)
def test_malicious_agent_never_hangs_a_call_or_blows_up_memory(short_dir, frames, hang, wrong_sid) -> None:
    path = short_dir / f"a{next(_seq)}.sock"
    peer = MaliciousAgent(path, frames, hang, wrong_sid)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        t = AgentTransport(path, connect_timeout=1, op_timeout=1)
        # A peer that hangs up must end even a call without a timeout: run that one on a
        # thread and give it 2 s. A silent peer is left to the command's own timeout.
        outcome: list[object] = []

        def call() -> None:
            try:
                outcome.append(t.exec(ExecRequest("true", "raw", TIMEOUT if hang else None)))
            except SmolVMError as exc:  # typed, as it must be
                outcome.append(exc)
            except BaseException as exc:  # anything else is a finding
                outcome.append(AssertionError(f"untyped {exc!r}"))

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join((TIMEOUT if hang else 0.0) + 2.0)
        took = time.monotonic() - t0
        assert outcome, f"the call did not end within {took:.2f} s (hang={hang})"
        assert isinstance(outcome[0], (CommandResult, SmolVMError)), outcome[0]
        # The next call on the same transport must not hang on a connection whose reader
        # died (it fails at once, or reconnects and is refused).
        t1 = time.monotonic()
        try:
            t.ping()
        except SmolVMError:
            pass
        finally:
            t.close()
        took_next = time.monotonic() - t1
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        peer.close()
        path.unlink(missing_ok=True)
    assert took < TIMEOUT + 2.0, f"call took {took:.2f} s"
    assert took_next < 1 + 2.0, f"the next call took {took_next:.2f} s"  # its timeouts are 1 s
    assert peak < 4 * MAX_IN_PAYLOAD, f"host buffered {peak} bytes"


def _event(code: int, path: bytes, sid: int = 0) -> tuple[int, bytes]:
    payload = struct.pack("<I", code) + path
    return OP_WATCH_EVENT, HDR.pack(b"SV", OP_WATCH_EVENT, 0, sid, len(payload)) + payload


@pytest.mark.parametrize(
    "bad",
    [
        _event(99, b"/x"),  # no such event
        _event(1, b"/" + b"a" * 5000),  # longer than PATH_MAX
        (OP_WATCH_EVENT, HDR.pack(b"SV", OP_WATCH_EVENT, 0, 0, 2) + b"\x01\x00"),  # short
    ],
    ids=["unknown-event", "long-path", "short"],
)
def test_malicious_watch_events_end_the_watch_with_a_typed_error(short_dir, bad) -> None:
    ok = (OP_OK, HDR.pack(b"SV", OP_OK, 0, 0, 0))
    frames = [ok, _event(1, b"/w/a"), bad]
    peer = MaliciousAgent(short_dir / f"w{next(_seq)}.sock", frames, True, False, first_op=OP_WATCH)
    t = AgentTransport(peer.path, connect_timeout=1, op_timeout=1)
    try:
        w = t.watch("/w")
        assert w.get(2) == ("create", "/w/a")
        with pytest.raises(TransportError, match="malformed"):
            w.get(2)
        assert w.stopped
    finally:
        t.close()
        peer.close()


def test_an_event_flood_is_capped_on_the_host(short_dir) -> None:
    ok = (OP_OK, HDR.pack(b"SV", OP_OK, 0, 0, 0))
    # raw bytes are sent as they are: stream 1, the transport's first
    flood = b"".join(_event(2, b"/w/" + b"f" * 4000, sid=1)[1] for _ in range(WATCH_QUEUE + 500))
    peer = MaliciousAgent(
        short_dir / f"w{next(_seq)}.sock", [ok, (None, flood)], True, False, first_op=OP_WATCH
    )
    t = AgentTransport(peer.path, connect_timeout=1, op_timeout=1)
    try:
        w = t.watch("/w")
        end = time.monotonic() + 30
        while w.queued < WATCH_QUEUE and time.monotonic() < end:
            time.sleep(0.05)
        events = w.pending()
        assert len(events) == WATCH_QUEUE and events[-1] == ("overflow", "")
    finally:
        t.close()
        peer.close()
