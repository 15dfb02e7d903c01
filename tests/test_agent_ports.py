"""Several processes holding a command channel to one QEMU VM at once (real guest, real
agent). QEMU's chardev socket serves one client per port, so a VM has AGENT_PORTS agent
ports and every process (every AgentTransport) takes a free one under a flock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from smolvm import SmolVM
from smolvm.backends.base import AGENT_PORTS, agent_lock_path, agent_sockets
from smolvm.exceptions import CommandExecutionUnavailableError
from smolvm.locks import try_lock
from smolvm.transports.agent import AgentTransport
from smolvm.transports.agent_proto import HDR, OP_EXEC
from smolvm.transports.base import ExecRequest
from test_agent_support import hello_frame, read_until

pytestmark = pytest.mark.e2e

#: A separate process holding a SmolVM for the VM; driven line by line over stdin/stdout.
HOLDER = textwrap.dedent("""
    import sys
    from smolvm import SmolVM
    vm_id, data_dir = sys.argv[1:3]
    vm = SmolVM.from_id(vm_id, data_dir=data_dir)
    def say(*a):
        print(*a, flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "hold":  # run one command: the channel (a port) stays held
                vm.run("true", shell="raw")
                say("port", vm._transport.connected_path.name)
            elif cmd == "short":  # many short commands
                for i in range(int(arg)):
                    r = vm.run(f"echo {i}", shell="raw")
                    assert (r.exit_code, r.stdout) == (0, f"{i}\\n"), r
                say("short-ok", arg)
            elif cmd == "spawn":  # a long command in the background of this process
                h = vm.spawn(arg, shell="raw")
                say("pid", h.pid)
            elif cmd == "wait":
                r = h.wait(120)
                say("exit", r.exit_code, r.stdout.strip().replace("\\n", "|"))
            elif cmd == "close":
                vm.close()
                say("closed")
                break
        except Exception as exc:
            say("error", type(exc).__name__, str(exc).replace("\\n", " "))
""")


class Holder:
    def __init__(self, vm: SmolVM) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, vm.vm_id, str(vm.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def ask(self, line: str) -> list[str]:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.reply()

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def reply(self) -> list[str]:
        out = self.p.stdout.readline().split()
        assert out and out[0] != "error", out
        return out

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.ask("close")
                self.p.wait(10)
            except (OSError, AssertionError, subprocess.TimeoutExpired, ValueError):
                self.p.kill()
                self.p.wait(10)
        for f in (self.p.stdin, self.p.stdout):
            f.close()


@pytest.fixture(scope="module")
def vm(shared_vm):
    return shared_vm


@pytest.fixture
def holders(vm):
    made: list[Holder] = []

    def make() -> Holder:
        h = Holder(vm)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def _sockets(vm: SmolVM) -> list[Path]:
    mgr = vm.manager
    return agent_sockets(mgr.spec(mgr.state.get_vm(vm.vm_id)))


def _guest_pids(vm: SmolVM, name: str) -> list[str]:
    out = vm.run("ps -o pid,args", shell="raw").stdout
    return [ln.split()[0] for ln in out.splitlines() if name in ln and "ps -o" not in ln]


def test_vm_has_named_agent_ports(vm):
    socks = _sockets(vm)
    assert len(socks) == AGENT_PORTS == 4
    assert [s.name for s in socks] == [f"smolvm-{vm.vm_id}.agent.sock"] + [
        f"smolvm-{vm.vm_id}.agent{i}.sock" for i in range(1, 4)
    ]
    assert all(s.is_socket() for s in socks)
    names = vm.run("cat /sys/class/virtio-ports/*/name", shell="raw").stdout.split()
    assert sorted(names) == ["smolvm.agent", "smolvm.agent.1", "smolvm.agent.2", "smolvm.agent.3"]
    # Recorded before launch, so a crash leaves nothing reconcile cannot find.
    recorded = {r["value"] for r in vm.manager.state.resources(vm.vm_id, "socket")}
    assert {str(s) for s in socks} <= recorded


@pytest.mark.timeout(300)
def test_two_processes_run_concurrently(vm, holders):
    """The test process and another process each hold a SmolVM for the same VM: a long
    command in one survives many short ones in the other, both ways round."""
    long_cmd = "sleep 6; echo long-done"
    h = vm.spawn(long_cmd, shell="raw")  # the test process's channel: port 0
    other = holders()
    assert other.ask("short 60") == ["short-ok", "60"]
    assert h.is_running(), "another process's HELLO must not end this process's session"
    r = h.wait(60)
    assert (r.exit_code, r.stdout) == (0, "long-done\n")
    assert vm._transport.connected_path.name.endswith(".agent.sock")

    # Reverse: the other process runs the long command, this one many short ones.
    pid = other.ask("spawn " + long_cmd)[1]
    for i in range(60):
        assert vm.run(f"echo {i}", shell="raw").stdout == f"{i}\n"
    assert pid in _guest_pids(vm, "long-done"), "its command must still run"
    assert other.ask("wait") == ["exit", "0", "long-done"]

    # Interleaved, at the same time.
    other.send("short 80")
    for i in range(80):
        assert vm.run(f"echo p{i}", shell="raw").stdout == f"p{i}\n"
    assert other.reply() == ["short-ok", "80"]


@pytest.mark.timeout(300)
def test_cli_run_while_a_script_holds_the_vm(vm):
    """The reported case: `smolvm run VM -- ...` while a Python script holds a SmolVM."""
    h = vm.spawn("sleep 3; echo still-here", shell="raw")
    env = {**os.environ, "SMOLVM_DATA_DIR": str(vm.data_dir)}
    cli = Path(sys.executable).with_name("smolvm")
    for _ in range(3):
        p = subprocess.run(
            [str(cli), "run", vm.vm_id, "--", "echo", "from-cli"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (p.returncode, p.stdout) == (0, "from-cli\n"), p.stderr
    r = h.wait(60)
    assert (r.exit_code, r.stdout) == (0, "still-here\n")


@pytest.mark.timeout(300)
def test_fifth_holder_gets_a_clear_error_then_a_freed_port(vm, holders):
    vm.run("true")  # this process: one port
    others = [holders() for _ in range(AGENT_PORTS - 1)]
    port_of = [o.ask("hold")[1] for o in others]
    assert len(set(port_of)) == AGENT_PORTS - 1
    assert vm._transport.connected_path.name not in port_of

    fifth = AgentTransport(_sockets(vm), connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CommandExecutionUnavailableError) as ei:
        fifth.exec(ExecRequest("true", shell="raw"))
    assert 0.9 < time.monotonic() - t0 < 10
    assert "at most 4 processes can hold a command channel to one VM at once" in ei.value.remediation
    assert "comm_channel='ssh'" in ei.value.remediation
    fifth.close()

    # It waits for a port instead when one frees up within connect_timeout.
    waiter = AgentTransport(_sockets(vm), connect_timeout=30.0)
    got: list = []
    th = threading.Thread(target=lambda: got.append(waiter.exec(ExecRequest("echo got-a-port", shell="raw"))))
    th.start()
    try:
        time.sleep(1.0)
        assert not got, "all ports are held: it must wait"
        assert others[1].ask("close") == ["closed"]
        th.join(30)
        assert got and got[0].stdout == "got-a-port\n"
        assert waiter.connected_path.name == port_of[1]
    finally:
        th.join(30)
        waiter.close()
    # Every other holder's channel still works (no HELLO ended their sessions).
    for o in (others[0], others[2]):
        o.send("short 5")
        assert o.reply() == ["short-ok", "5"]
    assert vm.run("echo mine", shell="raw").stdout == "mine\n"


@pytest.mark.timeout(300)
def test_port_of_a_killed_holder_is_reusable(vm, holders):
    vm.run("true")
    victim = holders()
    port = victim.ask("hold")[1]
    pid = victim.ask("spawn exec sleep 777")[1]
    assert pid in _guest_pids(vm, "sleep 777")
    lock = agent_lock_path(next(s for s in _sockets(vm) if s.name == port))
    assert lock.exists() and oct(lock.stat().st_mode & 0o777) == "0o600"
    victim.kill9()

    # The killed process's lock died with it: all the other ports can be taken again,
    # including its own, and its command ends with its session (QEMU saw the hang-up).
    ts = [AgentTransport(_sockets(vm), connect_timeout=10.0) for _ in range(AGENT_PORTS - 1)]
    try:
        for t in ts:
            assert t.exec(ExecRequest("echo ok", shell="raw")).stdout == "ok\n"
        assert port in {t.connected_path.name for t in ts}
        end = time.monotonic() + 10
        while pid in _guest_pids(vm, "sleep 777") and time.monotonic() < end:
            time.sleep(0.1)
        assert pid not in _guest_pids(vm, "sleep 777")
    finally:
        for t in ts:
            t.close()


def test_host_dying_mid_frame_leaves_the_port_usable(vm):
    """QEMU's virtio-serial chardev: the guest's byte stream outlives host connections. A
    host that dies mid-frame leaves half a frame in it; the next host's HELLO resyncs the
    agent, and a new HELLO ends the previous host's session (its commands are killed)."""
    import socket

    sock = next(p for p in _sockets(vm) if p.is_socket())
    lock = None
    for p in _sockets(vm):  # take a free port the way AgentTransport does
        lock = try_lock(agent_lock_path(p))
        if lock is not None:
            sock = p
            break
    assert lock is not None, "no free agent port"
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.sendall(hello_frame(b"OLDHOST1"))
        read_until(s, b"OLDHOST1", timeout=30)
        s.sendall(HDR.pack(b"SV", OP_EXEC, 0, 9, 200_000) + b"\0" * 1000)  # dies mid-frame
        s.close()
    finally:
        os.close(lock)
    t = AgentTransport([sock], connect_timeout=30)
    try:
        assert t.exec(ExecRequest("echo resynced", "raw", 30)).stdout == "resynced\n"
        h = t.spawn(ExecRequest("exec sleep 1000", "raw", None))
        pid = h.pid
    finally:
        t.close()
    t2 = AgentTransport([sock], connect_timeout=30)
    try:
        assert t2.exec(ExecRequest("echo second host", "raw", 30)).stdout == "second host\n"
        end = time.monotonic() + 10
        while t2.exec(ExecRequest(f"kill -0 {pid}", "raw", 30)).exit_code == 0:
            assert time.monotonic() < end, "a new HELLO must end the previous session's commands"
            time.sleep(0.05)
    finally:
        t2.close()
