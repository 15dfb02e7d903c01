"""Connection handling of the agent channel: unavailability, reconnects, clients dying
mid-command, garbage input, resynchronisation on a persistent stream (virtio-serial)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolvm.exceptions import CommandExecutionUnavailableError, OperationTimeoutError, TransportError
from smolvm.transports.agent import AgentTransport
from smolvm.transports.agent_proto import (
    HDR,
    MAX_PAYLOAD,
    OP_EXEC,
    OP_FILE_DATA,
    OP_FILE_END,
    OP_KILL,
    OP_PING,
    OP_READ_FILE,
    OP_SET_TIME,
    OP_STDIN,
    OP_WRITE_FILE,
)
from smolvm.transports.base import ExecRequest
from test_agent_support import (  # noqa: F401  (fixtures are imported by name)
    Agent,
    agent,
    agent_bin,
    gone,
    hello_frame,
    needs_busybox,
    pump,
    read_until,
    run,
    shared,
    shell,
    t,
)

pytestmark = needs_busybox


# -- connection handling ------------------------------------------------------------------
def test_unavailable_when_no_socket(tmp_path, shell):
    tr = AgentTransport(tmp_path / "missing.sock", shell_path=shell)
    with pytest.raises(CommandExecutionUnavailableError) as ei:
        tr.exec(ExecRequest("true"))
    assert ei.value.remediation
    with pytest.raises(OperationTimeoutError):
        tr.wait_ready(0.3)
    tr.close()
    tr.close()  # idempotent


def test_unavailable_when_nothing_answers(tmp_path, shell):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "mute.sock"))
    srv.listen()
    try:
        tr = AgentTransport(tmp_path / "mute.sock", shell_path=shell, connect_timeout=0.5)
        with pytest.raises(CommandExecutionUnavailableError, match="no HELLO"):
            tr.ping()
    finally:
        srv.close()


def test_wait_ready_and_reconnect_after_close_mid_command(t, agent):
    t.wait_ready(5)
    errors: list[BaseException] = []
    h = t.spawn(ExecRequest("exec sleep 1000", shell="raw", timeout=None))

    def long_exec():
        try:
            run(t, "sleep 1000", timeout=None)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=long_exec)
    th.start()
    time.sleep(0.2)
    t.close()
    th.join(5)
    assert len(errors) == 1 and isinstance(errors[0], TransportError)
    assert gone(h.pid), "the agent must kill commands of a vanished client"
    assert run(t, "echo again").stdout == "again\n"  # lazily reconnected
    assert agent.alive()


def test_client_killed_mid_command(agent, t, shell):
    """A separate client process dies (SIGKILL) while its command streams output."""
    script = textwrap.dedent(f"""
        import sys
        from smolvm.transports.agent import AgentTransport
        from smolvm.transports.base import ExecRequest
        t = AgentTransport({str(agent.sock)!r}, shell_path={shell!r})
        def out(chunk):
            sys.stdout.write(chunk.decode()); sys.stdout.flush()
        t.exec(ExecRequest("echo $$; while :; do echo tick; sleep 0.01; done", shell="raw", timeout=None),
               on_stdout=out)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    pid = int(p.stdout.readline())
    assert p.stdout.readline() == b"tick\n"
    p.kill()
    p.wait()
    p.stdout.close()
    assert gone(pid)
    assert run(t, "echo alive").stdout == "alive\n"


def test_garbage_does_not_crash_agent(agent, t):
    rng = __import__("random").Random(1234)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(agent.sock))
    s.sendall(bytes(rng.randrange(256) for _ in range(100_000)))
    s.sendall(HDR.pack(b"SV", 0xEE, 0, 1, 10) + b"x" * 10)  # unknown op
    s.sendall(HDR.pack(b"SV", OP_PING, 0, 1, 0xFFFFFFF0))  # absurd length
    s.sendall(hello_frame(b"N1234567"))
    read_until(s, b"N1234567")
    # Malformed payloads inside a valid session get ERROR frames, not a crash.
    s.sendall(HDR.pack(b"SV", OP_EXEC, 0, 5, 3) + b"abc")
    s.sendall(HDR.pack(b"SV", OP_EXEC, 0, 6, 14) + b"\0" * 8 + b"\x01\0\0\0" + b"\0\0")
    buf = read_until(s, b"malformed EXEC")
    s.sendall(HDR.pack(b"SV", OP_PING, 0, 7, 4) + b"pong")
    read_until(s, b"pong")
    s.close()
    assert agent.alive()
    assert run(t, "echo fine").stdout == "fine\n"
    assert buf


@pytest.mark.timeout(60)
def test_firecracker_vsock_connect_preamble(agent, shell, tmp_path):
    """Firecracker's vsock UDS: the host sends "CONNECT <port>\\n" and gets "OK <n>\\n"."""
    uds = tmp_path / "fc.vsock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(uds))
    srv.listen()
    ports: list[bytes] = []

    def serve_one():
        c, _ = srv.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += c.recv(1)
        ports.append(line)
        up = socket.socket(socket.AF_UNIX)
        up.connect(str(agent.sock))
        c.sendall(b"OK 1073741824\n")
        pumps = [threading.Thread(target=pump, args=(a, b), daemon=True) for a, b in ((c, up), (up, c))]
        for p in pumps:
            p.start()

    threading.Thread(target=serve_one, daemon=True).start()
    tr = AgentTransport(uds, shell_path=shell, vsock_port=52)
    try:
        assert run(tr, "echo via-vsock").stdout == "via-vsock\n"
        assert ports == [b"CONNECT 52\n"]
    finally:
        tr.close()
        srv.close()


def test_agent_ports_are_taken_under_a_lock(agent_bin, shell, tmp_path):
    """Several sockets (QEMU's agent ports): each transport takes the first free one under a
    flock on <socket>.lock; with all held it waits connect_timeout, then a clear error."""
    agents = [Agent(agent_bin, tmp_path / "a.sock"), Agent(agent_bin, tmp_path / "a1.sock")]
    paths = [a.sock for a in agents] + [tmp_path / "a2.sock"]  # a missing port is skipped
    ts = [AgentTransport(paths, shell_path=shell, connect_timeout=0.5) for _ in range(3)]
    try:
        assert run(ts[0], "echo 0").stdout == "0\n" and ts[0].connected_path == paths[0]
        assert run(ts[1], "echo 1").stdout == "1\n" and ts[1].connected_path == paths[1]
        assert (tmp_path / "a.sock.lock").stat().st_mode & 0o777 == 0o600
        t0 = time.monotonic()
        with pytest.raises(CommandExecutionUnavailableError) as ei:
            run(ts[2], "echo 2")
        assert time.monotonic() - t0 >= 0.45
        assert "at most 2 processes can hold a command channel" in ei.value.remediation
        ts[0].close()  # frees port 0
        assert run(ts[2], "echo 2").stdout == "2\n" and ts[2].connected_path == paths[0]
        with pytest.raises(CommandExecutionUnavailableError):  # a closed transport reconnects
            run(ts[0], "echo again")  # only to a free port
        ts[1].close()
        assert run(ts[0], "echo again").stdout == "again\n" and ts[0].connected_path == paths[1]
    finally:
        for t in ts:
            t.close()
        for a in agents:
            a.stop()


def test_wait_ready_before_agent_starts(agent_bin, shell, tmp_path):
    sock = tmp_path / "late.sock"
    tr = AgentTransport(sock, shell_path=shell)
    holder: list[Agent] = []
    timer = threading.Timer(0.5, lambda: holder.append(Agent(agent_bin, sock)))
    timer.start()
    try:
        tr.wait_ready(20)
        assert run(tr, "echo late").stdout == "late\n"
    finally:
        timer.join()
        tr.close()
        for a in holder:
            a.stop()


# -- fuzzing ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_agent(agent_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    a = Agent(agent_bin, d / "agent.sock")
    yield a, d
    a.stop()


def _exec_payload(draw_bytes: bytes, to: int, fl: int, argc: int, envc: int) -> bytes:
    # argv[0] is always a path that cannot exist: well-formed requests fail with ENOENT.
    return struct.pack("<IIHH", to, fl, argc, envc) + b"\0/nonexistent/smolvm-fuzz\0" + draw_bytes


_frames = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                OP_PING,
                OP_STDIN,
                OP_KILL,
                OP_FILE_DATA,
                OP_FILE_END,
                OP_SET_TIME,
                OP_READ_FILE,
                0x00,
                0x03,
                0x13,
                0x44,
                0x7F,
                0xFF,
            ]
        ),
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda fl, sid, b, to, xf, ac, ec: (OP_EXEC, fl, sid, _exec_payload(b, to, xf, ac, ec)),
        st.integers(0, 255),
        st.integers(1, 8),
        st.binary(max_size=200),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
        st.integers(0, 65535),
    ),
    st.builds(
        lambda sid, mode, name: ("write", sid, mode, name),
        st.integers(1, 8),
        st.integers(0, 2**32 - 1),
        st.text("abcxyz_.-", min_size=1, max_size=12),
    ),
    st.binary(min_size=1, max_size=64).map(lambda b: ("raw", b)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_frames, max_size=25))
def test_fuzzed_frames_never_break_the_agent(fuzz_agent, frames):
    """Random (mostly malformed) frames after a HELLO; afterwards a PING still answers."""
    a, d = fuzz_agent
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(a.sock))
    got = bytearray()
    reader = threading.Thread(target=lambda: _drain(s, got), daemon=True)
    reader.start()
    try:
        s.sendall(hello_frame(b"FUZZNNCE"))
        for f in frames:
            if f[0] == "raw":
                s.sendall(f[1])
            elif f[0] == "write":  # uploads only ever target the fuzz directory
                _, sid, mode, name = f
                path = str(d / name).encode()
                s.sendall(
                    HDR.pack(b"SV", OP_WRITE_FILE, 0, sid, 8 + len(path)) + struct.pack("<II", mode, 3) + path
                )
            else:
                op, fl, sid, payload = f
                s.sendall(HDR.pack(b"SV", op, fl, sid, len(payload)) + payload)
        # Raw garbage may have started a bogus frame: pad it out like the client's retry
        # does, start a new session, then PING.
        s.sendall(
            bytes(MAX_PAYLOAD + 64)
            + hello_frame(b"FUZZAGN2")
            + HDR.pack(b"SV", OP_PING, 0, 99, 6)
            + b"alive!"
        )
        end = time.monotonic() + 10
        while b"alive!" not in got and time.monotonic() < end:
            time.sleep(0.005)
        assert b"alive!" in got
    finally:
        s.shutdown(socket.SHUT_RDWR)  # wakes the reader; close() alone would not
        s.close()
        reader.join(5)
    assert a.alive()


def _drain(s: socket.socket, into: bytearray) -> None:
    try:
        while chunk := s.recv(65536):
            into += chunk
    except OSError:
        pass
