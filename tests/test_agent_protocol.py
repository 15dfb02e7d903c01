"""The real guest agent, compiled for the host and run with --listen-unix, driven through
AgentTransport: commands, processes and control ops. No mocks: real processes and sockets.

The agent never runs with --pid1 here (it would kill every process and reboot the host).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from smolvm.exceptions import ImageError, OperationTimeoutError, TransportError
from smolvm.guest import AGENT_SOURCES, build_agent
from smolvm.transports.agent import AgentError, AgentTransport
from smolvm.transports.base import ExecRequest
from test_agent_support import (  # noqa: F401  (fixtures are imported by name)
    agent,
    agent_bin,
    gone,
    needs_busybox,
    run,
    shared,
    shell,
    t,
)

pytestmark = needs_busybox


# -- build --------------------------------------------------------------------------------
def test_build_agent_static(tmp_path):
    agent_bin = build_agent(tmp_path / "sub" / "agent")
    assert os.access(agent_bin, os.X_OK)
    assert _is_static_elf(agent_bin)
    assert all(p.exists() for p in AGENT_SOURCES)


def _is_static_elf(path: Path) -> bool:
    """No PT_INTERP program header: the kernel runs it without a dynamic loader."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types


def test_build_agent_without_compiler(tmp_path):
    with pytest.raises(ImageError) as ei:
        build_agent(tmp_path / "agent", cc="no-such-compiler-xyz")
    assert "apt-get install musl-tools" in ei.value.message


def test_pid1_refused_when_not_pid1(agent_bin):
    p = subprocess.Popen([str(agent_bin), "--pid1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rc = p.wait(5)
    finally:
        if p.poll() is None:
            p.kill()  # SIGKILL, never SIGTERM: a wrongly started PID-1 agent would shut down
            p.wait()
    assert rc == 2
    assert b"refused" in p.stderr.read()
    p.stdout.close(), p.stderr.close()


# -- commands -----------------------------------------------------------------------------
def test_echo_exit_code_stderr(t):
    r = run(t, "echo hello; echo oops >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "hello\n", "oops\n")
    assert r.duration > 0
    assert run(t, "true").ok
    assert run(t, "kill -TERM $$").exit_code == 128 + signal.SIGTERM


def test_login_shell_mode(t, tmp_path):
    """ "login" runs a login shell (it reads ~/.profile); "raw" does not."""
    (tmp_path / ".profile").write_text("export SMOLVM_LOGIN_MARKER=from-profile\n")
    env = {"HOME": str(tmp_path)}
    probe = "echo ${SMOLVM_LOGIN_MARKER:-none}"
    assert t.exec(ExecRequest(probe, shell="login", env=env)).stdout == "from-profile\n"
    assert t.exec(ExecRequest(probe, shell="raw", env=env)).stdout == "none\n"


def test_argv_is_not_interpolated(t):
    r = run(t, "printf '%s|' \"$@\"; echo; echo '$HOME' \"a  b\"")
    assert r.stdout.splitlines()[1] == "$HOME a  b"


def test_env_cwd_stdin(t, tmp_path):
    r = run(
        t,
        "echo $FOO; echo $PATH; echo $HOME; pwd; cat",
        env={"FOO": "b a r", "HOME": "/tmp"},
        cwd=str(tmp_path),
        stdin=b"line1\nline2",
    )
    foo, path, home, cwd, *rest = r.stdout.split("\n")
    assert foo == "b a r" and "/usr/bin" in path and home == "/tmp" and cwd == str(tmp_path)
    assert "\n".join(rest) == "line1\nline2"
    # No env given: the agent's defaults (documented in agent_proc.c).
    r = run(t, "echo $HOME $TERM $LANG; pwd")
    assert r.stdout == "/root xterm C.UTF-8\n/root\n"
    with pytest.raises(AgentError) as ei:
        run(t, "true", cwd="/does/not/exist")
    assert "No such file" in ei.value.message


def test_large_stdin(t):
    data = os.urandom(5 * 1024 * 1024)
    r = run(t, "sha256sum", stdin=data)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert run(t, "cat >/dev/null; echo done", stdin=b"").stdout == "done\n"


def test_stdin_overflow_is_reported(t):
    """The agent buffers at most 64 MiB of stdin for a command that does not read it."""
    h = t.spawn(ExecRequest("exec sleep 120", shell="raw", stdin=bytes(70 << 20)))
    h.kill()
    with pytest.raises(AgentError, match="stdin"):
        h.wait(10)
    assert run(t, "echo ok").stdout == "ok\n"


def test_missing_shell_is_a_transport_error(agent):
    tr = AgentTransport(agent.sock, shell_path="/no/such/shell")
    with pytest.raises(TransportError, match="could not start"):
        tr.exec(ExecRequest("true"))
    tr.close()


@pytest.mark.timeout(300)
def test_100mb_binary_output(t, agent, tmp_path):
    blob = tmp_path / "blob"
    h = hashlib.sha256()
    with open(blob, "wb") as f:
        for _ in range(100):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    r = run(t, f"cat {blob}", timeout=240)
    assert len(r.stdout_bytes) == 100 << 20
    assert hashlib.sha256(r.stdout_bytes).hexdigest() == h.hexdigest()
    # Back-pressure: the agent never held the stream in memory.
    hwm = [ln for ln in Path(f"/proc/{agent.pid}/status").read_text().splitlines() if ln.startswith("VmHWM")]
    assert int(hwm[0].split()[1]) < 32 * 1024, hwm


def test_concurrent_commands(t, tmp_path):
    """The first command can only finish after the second one ran: they must overlap."""
    flag = tmp_path / "flag"
    results: dict[int, object] = {}

    def waiter():
        results[0] = run(t, f"while [ ! -e {flag} ]; do sleep 0.01; done; echo waited", timeout=30)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(t, f"echo {i}"))) for i in range(1, 9)
    ]
    for x in threads:
        x.start()
    for x in threads:
        x.join()
    run(t, f"touch {flag}")
    th.join(30)
    assert results[0].stdout == "waited\n"
    assert all(results[i].stdout == f"{i}\n" for i in range(1, 9))


def test_streaming_callbacks_arrive_before_exit(t, tmp_path):
    """The command waits for a file that only the on_stdout callback creates."""
    flag = tmp_path / "go"
    seen: list[bytes] = []

    def on_out(chunk: bytes) -> None:
        seen.append(chunk)
        if b"first" in chunk:
            flag.touch()

    r = t.exec(
        ExecRequest(
            f"echo first; while [ ! -e {flag} ]; do sleep 0.01; done; echo second >&2",
            shell="raw",
            timeout=20,
        ),
        on_stdout=on_out,
        on_stderr=seen.append,
    )
    assert r.stdout == "first\n" and r.stderr == "second\n"
    assert seen == [b"first\n", b"second\n"]


def test_timeout_kills_process_group(t):
    with pytest.raises(OperationTimeoutError) as ei:
        run(t, "sleep 1000 & echo $!; wait", timeout=0.5)
    assert "timed out" in ei.value.message
    bg = int(ei.value.details["stdout"].split()[0])
    assert gone(bg), "background child of a timed-out command survived"
    assert run(t, "echo next").stdout == "next\n"


def test_background_command_survives_normal_exit(t, tmp_path):
    """Only a timeout/kill/disconnect reaches the process group, not a normal exit."""
    r = run(t, "sleep 1000 >/dev/null 2>&1 & echo $!")
    pid = int(r.stdout)
    try:
        assert not gone(pid, within=0.3)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_spawn_kill_and_handle(t):
    h = t.spawn(ExecRequest("echo started; exec sleep 1000", shell="raw", timeout=None))
    assert h.pid and h.is_running()
    end = time.monotonic() + 5
    while h.stdout != b"started\n" and time.monotonic() < end:
        time.sleep(0.01)
    assert h.stdout == b"started\n"
    with pytest.raises(OperationTimeoutError):
        h.wait(timeout=0.1)
    h.kill()
    r = h.wait(timeout=5)
    assert r.exit_code == 128 + 9 and not h.is_running()
    assert gone(h.pid)
    h2 = t.spawn(ExecRequest("echo out; echo err >&2; exit 3", shell="raw"))
    r2 = h2.wait(5)
    assert (r2.exit_code, r2.stdout, r2.stderr, h2.stderr) == (3, "out\n", "err\n", b"err\n")


def test_low_priority_detached_spawn_can_be_forgotten(t, tmp_path):
    """SmolVM's background work after a restore: nice 19, detached, not followed."""
    done = tmp_path / "done"
    req = ExecRequest(
        f"read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ n _ < /proc/self/stat; echo $n > {done}",
        shell="raw",
        timeout=None,
        detach=True,
        host_work=True,
    )
    req.low_priority = True
    h = t.spawn(req)
    h.forget()
    end = time.monotonic() + 10
    while not (done.exists() and done.read_text()) and time.monotonic() < end:
        time.sleep(0.01)
    assert done.read_text().strip() == "19"  # the shell itself ran at nice 19
    assert t.exec(ExecRequest("echo still-talking", shell="raw")).stdout == "still-talking\n"
    plain = t.exec(
        ExecRequest("read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ n _ < /proc/self/stat; echo $n", "raw")
    )
    assert plain.stdout == "0\n"  # commands keep the default priority


# -- control ops --------------------------------------------------------------------------
def test_ping_time_entropy(t):
    assert 0 < t.ping() < 5
    assert abs(t.sync_time()) < 5  # --dry-run-time: computed, not applied to the host clock
    if os.geteuid() == 0:  # RNDADDENTROPY needs CAP_SYS_ADMIN, which root has here
        t.add_entropy(os.urandom(5000))
    else:
        with pytest.raises(AgentError) as ei:
            t.add_entropy(os.urandom(5000))
        assert ei.value.errno == 1, ei.value  # EPERM, reported typed


@pytest.mark.requires("unshare")
def test_set_hostname_in_own_uts_namespace(agent_bin, shell, tmp_path):
    sock = tmp_path / "uts.sock"
    p = subprocess.Popen(
        ["unshare", "-u", str(agent_bin), "--listen-unix", str(sock)], stdout=subprocess.PIPE
    )
    try:
        assert p.stdout.readline() == b"SMOLVM_READY\n"
        tr = AgentTransport(sock, shell_path=shell)
        tr.set_hostname("smol-test-1")
        assert run(tr, "hostname").stdout == "smol-test-1\n"
        assert socket.gethostname() != "smol-test-1"
        with pytest.raises(AgentError):
            tr.set_hostname("x" * 65)
        tr.shutdown()  # not PID 1: the agent just exits
        assert p.wait(5) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()


def test_sigterm_kills_commands_and_exits(agent, t):
    h = t.spawn(ExecRequest("exec sleep 1000", shell="raw"))
    os.kill(agent.pid, signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    assert gone(h.pid)
    assert not agent.sock.exists()
    with pytest.raises(TransportError):
        h.wait(5)
