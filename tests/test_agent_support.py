"""Shared helpers of the agent tests: build the real agent, run it on a UNIX socket.

Not a test module itself; the test_agent_*.py modules import its fixtures.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from smolvm.guest import build_agent
from smolvm.transports.agent import AgentTransport
from smolvm.transports.agent_proto import HDR, OP_HELLO, SYNC_MAGIC
from smolvm.transports.base import ExecRequest

needs_busybox = pytest.mark.requires("busybox")
SANITIZER_MARKS = (b"AddressSanitizer", b"runtime error:", b"LeakSanitizer")


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory) -> Path:
    # SMOLVM_TEST_AGENT_BIN runs the suite against another build (e.g. with sanitizers).
    if os.environ.get("SMOLVM_TEST_AGENT_BIN"):
        return Path(os.environ["SMOLVM_TEST_AGENT_BIN"])
    return build_agent(tmp_path_factory.mktemp("agentbin") / "agent")


@pytest.fixture(scope="session")
def shell(tmp_path_factory) -> str:
    # Like the guest's /usr/lib/smolvm/sh: busybox invoked as "sh".
    d = tmp_path_factory.mktemp("shell")
    (d / "sh").symlink_to("/bin/busybox")
    return str(d / "sh")


class Agent:
    """A running agent process listening on a UNIX socket."""

    def __init__(self, binary: Path, sock: Path, *extra: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.sock = sock
        args = [str(binary), *extra]
        if "--stream-fd" not in extra:
            args += ["--listen-unix", str(sock)]
        # stderr to a file: a pipe nobody reads would eventually block the agent's logging.
        self.log = sock.with_name(sock.name + ".log")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                args + ["--dry-run-time"], stdout=subprocess.PIPE, stderr=err, pass_fds=pass_fds
            )
        assert self.proc.stdout.readline() == b"SMOLVM_READY\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        log = self.log.read_bytes()
        assert not any(m in log for m in SANITIZER_MARKS), log.decode(errors="replace")[-3000:]


@pytest.fixture
def agent(agent_bin, tmp_path):
    a = Agent(agent_bin, tmp_path / "agent.sock")
    yield a
    a.stop()


@pytest.fixture
def t(agent, shell):
    tr = AgentTransport(agent.sock, shell_path=shell, connect_timeout=5)
    yield tr
    tr.close()


@pytest.fixture(scope="module")
def shared(agent_bin, shell, tmp_path_factory):
    a = Agent(agent_bin, tmp_path_factory.mktemp("shared") / "agent.sock")
    tr = AgentTransport(a.sock, shell_path=shell)
    yield tr
    tr.close()
    a.stop()


def run(t: AgentTransport, cmd: str, **kw) -> object:
    kw.setdefault("shell", "raw")
    return t.exec(ExecRequest(cmd, **kw))


def gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def hello_frame(nonce: bytes) -> bytes:
    return SYNC_MAGIC + HDR.pack(b"SV", OP_HELLO, 0, 0, 12) + (1).to_bytes(4, "little") + nonce


def read_until(s: socket.socket, needle: bytes, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while needle not in buf:
        chunk = s.recv(65536)
        assert chunk, "agent closed the connection"
        buf += chunk
    return buf


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
