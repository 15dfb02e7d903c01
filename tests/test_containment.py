"""Contained commands on real guests: every command session has its own cgroup, so fork
bombs, memory hogs and spinners never take the sandbox down, killing a session kills all
it started, and a guest kernel panic is reported as a crash (VM ERROR) at once."""

from __future__ import annotations

import time

import pytest

from smolvm import GuestCrashedError, Limits, OperationTimeoutError, ValidationError, VMState

pytestmark = pytest.mark.e2e

ALIVE_WITHIN_S = 5.0


def alive(vm) -> None:
    """The sandbox answers a fresh command within ALIVE_WITHIN_S seconds."""
    r = vm.run("echo alive", timeout=ALIVE_WITHIN_S, shell="raw")
    assert r.output == "alive"


def gone(vm, pattern: str, within: float = 5.0) -> bool:
    """No guest process whose command line matches ``pattern`` (a grep -E regex)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        out = vm.run(f"ps -o args | grep -E '{pattern}' | grep -v grep | wc -l", shell="raw").output
        if out == "0":
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def box(tmp_path_factory, default_image):
    from smolvm import SmolVM

    vm = SmolVM(data_dir=tmp_path_factory.mktemp("containment"))
    try:
        vm.start()
        yield vm
    finally:
        vm.__exit__(None, None, None)


def test_commands_run_in_their_own_session_group(box) -> None:
    own = box.run("cat /proc/self/cgroup", shell="raw").output
    assert own.startswith("0::/smolvm-cmd/s"), own
    h = box.spawn("cat /proc/self/cgroup; sleep 30", shell="raw")
    try:
        end = time.monotonic() + 10
        while not h.stdout and time.monotonic() < end:
            time.sleep(0.02)
        other = box.run("cat /proc/self/cgroup", shell="raw").output
        assert other.startswith("0::/smolvm-cmd/s") and other.encode() not in h.stdout  # one each
    finally:
        h.kill()
    assert box.run("cat /proc/1/cgroup", shell="raw").output == "0::/"  # the agent is not in it
    # Migrations between groups skip an RCU grace period (two per command).
    assert "favordynmods" in box.run("grep cgroup2 /proc/mounts", shell="raw").output


FORK_BOMBS = [
    "f(){ f|f& }; f",  # the classic
    "while :; do (sleep 60 &); done",  # an endless spawner in the session itself
    "setsid sh -c 'f(){ f|f& }; f' &",  # escapes the process group
    "(sh -c 'g(){ g & g & }; g' &) &",  # double fork away from the session's main process
]


def test_fork_bombs_memory_hog_and_spinner_leave_the_sandbox_answering(box) -> None:
    box.run("echo precious > /root/keep", shell="raw")
    server = box.spawn("exec python3 -m http.server 8765", detach=True, shell="raw")
    assert box.run(
        "for i in $(seq 100); do wget -qO- 127.0.0.1:8765/ >/dev/null 2>&1 && exit 0; sleep 0.1; done; "
        "exit 1",
        shell="raw",
        timeout=30,
    ).ok
    for bomb in FORK_BOMBS:
        try:
            box.run(bomb, shell="raw", timeout=8)
        except OperationTimeoutError:
            pass  # the endless spawner runs into its timeout (its whole session is killed)
        alive(box)
    grow = "python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'"  # touches every page
    hog = box.run(grow, shell="raw", timeout=120)
    assert hog.exit_code == 137, hog  # OOM-killed in its own session only
    alive(box)
    box.spawn("while :; do :; done", shell="raw")  # a CPU spinner left running
    alive(box)
    assert box.run("cat /root/keep", shell="raw").output == "precious"
    assert server.is_running()
    assert box.run("wget -qO- 127.0.0.1:8765/ | head -c 15", shell="raw", timeout=30).output.startswith(
        "<!DOCTYPE"
    )
    # Clean up for the next tests: every other session's processes, bombs included.
    box.run(
        "me=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); for g in /sys/fs/cgroup/smolvm-cmd/s*; "
        'do [ "$g" = "$me" ] || echo 1 > $g/cgroup.kill; done',
        shell="raw",
        timeout=30,
    )
    assert not server.is_running() or server.wait(10).exit_code == 137


def test_timeout_kills_the_whole_session(box) -> None:
    with pytest.raises(OperationTimeoutError):
        box.run("sleep 311 & setsid sleep 312 & (sleep 313 &) ; wait", shell="raw", timeout=5)
    assert gone(box, "sleep 31[123]"), "a background child of a timed-out command survived"


def test_kill_and_disconnect_kill_everything_a_session_started(box, tmp_path) -> None:
    from smolvm import SmolVM

    h = box.spawn("setsid sleep 321 & sleep 322", shell="raw")
    assert not gone(box, "sleep 32[12]", within=0.5)
    h.kill()
    assert gone(box, "sleep 32[12]")
    # Another process's channel goes away: its sessions die, detached ones stay.
    other = SmolVM.from_id(box.vm_id, data_dir=box.data_dir)
    other.spawn("setsid sleep 331 & sleep 332", shell="raw")
    other.spawn("sleep 333", shell="raw", detach=True)
    assert not gone(box, "sleep 33[12]", within=0.5)
    other.close()
    assert gone(box, "sleep 33[12]")
    assert not gone(box, "sleep 333", within=0.5)
    box.run("pkill -f 'sleep 333'", shell="raw")


def test_per_call_limits(box) -> None:
    r = box.run(
        "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/pids.max; for i in $(seq 60); do sleep 5 & done",
        shell="raw",
        timeout=30,
        limits=Limits(pids=20),
    )
    assert r.stdout.strip() == "20"
    assert "can't fork" in r.stderr or "Resource temporarily unavailable" in r.stderr, r.stderr
    hog = box.run(
        "python3 -c 'b = bytearray(200 << 20)'", shell="raw", timeout=60, limits=Limits(memory_mib=64)
    )
    assert hog.exit_code == 137
    with pytest.raises(ValidationError):
        Limits(pids=0)
    with pytest.raises(ValidationError, match="limits"):
        box.run("true", limits={"pids": 5})  # type: ignore[arg-type]


def test_kernel_panic_is_a_crash_within_two_seconds(vms) -> None:
    vm = vms.sandbox()
    with vm:
        assert vm.run("echo up").output == "up"
        t0 = time.monotonic()
        with pytest.raises(GuestCrashedError) as ei:
            vm.run("echo c > /proc/sysrq-trigger; sleep 30", shell="raw", timeout=60)
        took = time.monotonic() - t0
        assert took < 2.0, f"crash noticed after {took:.2f} s"
        # The crash's headline (the console's first crash line) and the console's tail.
        assert any(m in str(ei.value) for m in ("Kernel panic", "BUG:", "Oops", "sysrq")), str(ei.value)
        assert "Serial console:" in str(ei.value) and "RIP:" in str(ei.value), str(ei.value)
        info = vm.refresh()
        assert info.status is VMState.ERROR and info.error and info.error.startswith("guest crashed: ")
        assert any(m in info.error for m in ("Kernel panic", "BUG:", "Oops", "sysrq")), info.error
