"""Terminals (``vm.pty``, ``smolvm shell`` in a real tmux terminal) and ``vm.files.watch``
on a real guest."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from smolvm.callbacks import Callback
from smolvm.exceptions import CommandBlockedError, ValidationError
from smolvm.files import FilesystemEvent
from test_cli import SMOLVM, cli_env

pytestmark = pytest.mark.e2e


def test_pty_is_an_interactive_login_shell(shared_vm) -> None:
    with shared_vm.pty(cols=90, rows=25) as term:
        term.write("tty; stty size; echo $((6*7))\n")
        out = term.read_until("42\r\n", timeout=30)
        assert b"/dev/pts/" in out and b"25 90\r\n" in out
        term.resize(120, 40)
        term.write("stty size\n")
        term.read_until("40 120\r\n", timeout=30)
        term.write("sleep 60; echo not-interrupted\n")
        time.sleep(0.5)
        term.write(b"\x03")  # ^C: the terminal's foreground job, not the session
        term.write("echo $((1+1))-alive\n")
        rest = term.read_until("2-alive\r\n", timeout=30)
        assert b"\r\nnot-interrupted" not in rest
        term.write("exit 4\n")
        assert term.wait(30).exit_code == 4
    assert not term.is_running()


def test_pty_command_callbacks_and_checks(shared_vm) -> None:
    term = shared_vm.pty("echo pty-$((2*21))", cols=40, rows=10)
    assert term.wait(30).exit_code == 0
    assert term.read_until("pty-42", timeout=5)

    class NoTerminals(Callback):
        def on_pre_run(self, ctx) -> None:
            if ctx.shell == "pty":
                raise CommandBlockedError("no terminals here", ctx.command)

    from smolvm import SmolVM

    guarded = SmolVM.from_id(shared_vm.vm_id, data_dir=shared_vm.data_dir, callbacks=[NoTerminals()])
    try:
        with pytest.raises(CommandBlockedError):
            guarded.pty()
    finally:
        guarded.close()
    with pytest.raises(ValidationError, match="cols"):
        shared_vm.pty(cols=0)


def test_watch_sees_create_modify_delete_within_a_second(shared_vm) -> None:
    f = shared_vm.files
    d = f"/srv/watch-{uuid.uuid4().hex[:6]}"
    f.make_dir(d)
    seen: list[tuple[float, FilesystemEvent]] = []
    with f.watch(d, on_event=lambda ev: seen.append((time.monotonic(), ev))) as w:
        t0 = time.monotonic()
        shared_vm.run(f"echo one > {d}/a.txt", shell="raw")
        assert w.get(1.0) == FilesystemEvent("create", f"{d}/a.txt")
        assert w.get(1.0) == FilesystemEvent("write", f"{d}/a.txt")
        t1 = time.monotonic()
        shared_vm.run(f"echo two >> {d}/a.txt", shell="raw")
        assert w.get(1.0) == FilesystemEvent("write", f"{d}/a.txt")
        t2 = time.monotonic()
        shared_vm.run(f"rm {d}/a.txt", shell="raw")
        ev = w.get(1.0)
        assert ev is not None and (ev.type, ev.name) == ("remove", "a.txt")
    # every event reached the callback within a second of the command that caused it
    starts = [t0, t0, t1, t2]
    assert [ev.type for _, ev in seen] == ["create", "write", "write", "remove"]
    assert all(at - start < 1.0 for (at, _), start in zip(seen, starts, strict=True))
    assert w.get(0.2) is None  # stopped


def test_recursive_watch_and_missing_directory(shared_vm) -> None:
    f = shared_vm.files
    d = f"/srv/rwatch-{uuid.uuid4().hex[:6]}"
    f.make_dir(d)
    with f.watch(d, recursive=True) as w:
        shared_vm.run(f"mkdir -p {d}/x/y && echo hi > {d}/x/y/z", shell="raw")
        paths: set[str] = set()
        end = time.monotonic() + 5
        while f"{d}/x/y/z" not in paths and time.monotonic() < end:
            ev = w.get(0.5)
            if ev is not None:
                paths.add(ev.path)
        assert f"{d}/x" in paths and f"{d}/x/y/z" in paths
    from smolvm.exceptions import GuestFileNotFoundError

    with pytest.raises(GuestFileNotFoundError):
        f.watch("/no/such/dir")
    with pytest.raises(ValidationError):
        f.watch("relative/dir")


def _pane(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-J", "-t", session], capture_output=True, text=True, check=True
    ).stdout


def _wait_pane(session: str, needle: str, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while True:
        text = _pane(session)
        if needle in text:
            return text
        assert time.monotonic() < end, f"{needle!r} not on the screen:\n{text}"
        time.sleep(0.2)


def test_smolvm_shell_in_a_real_terminal(shared_vm) -> None:
    """`smolvm shell` in tmux: type a command and read the screen, resize the window, exit
    with a code, and find the local terminal restored (canonical mode, echo) afterwards."""
    assert shutil.which("tmux"), "tmux is installed by scripts/setup.sh"
    session = f"smolvm-test-{uuid.uuid4().hex[:8]}"
    env = cli_env(shared_vm.data_dir, TERM="xterm")
    cmd = " ".join(SMOLVM) + f" shell {shared_vm.vm_id}"
    script = f"{cmd}; echo EXIT=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\?icanon'; sleep 120"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", "sh", "-c", script],
        check=True,
        env=env,
    )
    try:
        _wait_pane(session, "#")  # the guest's prompt
        subprocess.run(["tmux", "send-keys", "-t", session, "echo $((6*7))-from-tmux", "Enter"], check=True)
        _wait_pane(session, "42-from-tmux")
        subprocess.run(["tmux", "send-keys", "-t", session, "stty size", "Enter"], check=True)
        _wait_pane(session, "30 100")
        subprocess.run(["tmux", "resize-window", "-t", session, "-x", "120", "-y", "40"], check=True)
        time.sleep(0.5)  # SIGWINCH reaches smolvm shell, which resizes the guest's terminal
        subprocess.run(["tmux", "send-keys", "-t", session, "clear; stty size", "Enter"], check=True)
        _wait_pane(session, "40 120")
        subprocess.run(["tmux", "send-keys", "-t", session, "exit 5", "Enter"], check=True)
        screen = _wait_pane(session, "EXIT=5")
        assert "\nicanon" in "\n" + screen.split("EXIT=5", 1)[1]  # the terminal was restored
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
