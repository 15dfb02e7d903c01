"""PTY sessions and directory watches of the real agent (run on the host with
--listen-unix), driven through AgentTransport. Real processes, terminals and inotify."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest

from smolvm.exceptions import AgentError, GuestFileNotFoundError, TransportError, ValidationError
from smolvm.transports.agent_proto import WATCH_QUEUE
from smolvm.transports.base import ExecRequest
from test_agent_support import (  # noqa: F401  (fixtures are imported by name)
    agent,
    agent_bin,
    needs_busybox,
    shell,
    t,
)

pytestmark = needs_busybox


class Screen:
    """What a PTY session printed, collected from the transport's reader thread."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()
        self.text = b""

    def __call__(self, chunk: bytes) -> None:
        self.q.put(chunk)

    def until(self, needle: bytes, timeout: float = 10) -> bytes:
        end = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < end, f"{needle!r} never appeared; got {self.text[-500:]!r}"
            try:
                self.text += self.q.get(timeout=0.1)
            except queue.Empty:
                pass
        return self.text


def test_pty_login_shell_is_a_real_terminal(t) -> None:
    screen = Screen()
    h = t.spawn(ExecRequest("", timeout=None, pty=(100, 30), capture=False), on_stdout=screen)
    h.write(b"tty; stty size; echo $((6*7))\n")
    out = screen.until(b"42\r\n")
    assert b"/dev/pts/" in out and b"30 100\r\n" in out  # a pty, with the size asked for
    h.resize(132, 43)
    h.write(b"stty size\n")
    screen.until(b"43 132\r\n")
    # ^C reaches the foreground job through the terminal (job control works) ...
    h.write(b"sleep 100; echo after-sleep\n")
    time.sleep(0.3)
    h.write(b"\x03")
    h.write(b"echo still-here\n")
    screen.until(b"still-here\r\n")
    assert b"after-sleep" not in screen.text.replace(b"echo after-sleep", b"")
    h.write(b"exit 7\n")
    assert h.wait(10).exit_code == 7 and h.stdout == b""  # capture=False keeps nothing


def test_pty_runs_a_command_and_reports_its_exit(t) -> None:
    screen = Screen()
    h = t.spawn(ExecRequest("printf 'a\\nb\\n'; exit 3", timeout=10, pty=(80, 24)), on_stdout=screen)
    assert h.wait(10).exit_code == 3
    assert screen.until(b"a\r\nb\r\n")  # the terminal's line discipline: \n -> \r\n


def test_pty_sizes_and_stdin_are_checked(t) -> None:
    for bad in ((0, 24), (80, 70000), (80.0, 24)):
        with pytest.raises(ValidationError):
            t.spawn(ExecRequest("true", pty=bad))  # type: ignore[arg-type]
    h = t.spawn(ExecRequest("sleep 5", timeout=10))
    try:
        with pytest.raises(TransportError, match="no stdin"):
            h.write(b"x")
        with pytest.raises(TransportError, match="PTY"):
            h.resize(80, 24)
    finally:
        h.kill()


def _wait_events(w, want: list[tuple[str, str]], timeout: float = 5) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    end = time.monotonic() + timeout
    while not all(e in got for e in want) and time.monotonic() < end:
        ev = w.get(0.1)
        if ev is not None:
            got.append(ev)
    return got


def test_watch_reports_every_kind_of_change(t, tmp_path: Path) -> None:
    d = tmp_path / "w"
    (d / "sub").mkdir(parents=True)
    w = t.watch(str(d))
    (d / "a").write_text("x")
    os.chmod(d / "a", 0o600)
    os.rename(d / "a", d / "b")
    (d / "b").unlink()
    (d / "sub" / "deep").write_text("not watched: not recursive")
    want = [
        ("create", f"{d}/a"),
        ("write", f"{d}/a"),
        ("chmod", f"{d}/a"),
        ("rename", f"{d}/a"),
        ("create", f"{d}/b"),
        ("remove", f"{d}/b"),
    ]
    got = _wait_events(w, want)
    assert [e for e in got if e in want] == want  # in order
    assert not any("deep" in p for _, p in got + w.pending())
    w.stop()
    (d / "late").write_text("after stop")
    assert w.get(0.3) is None and w.stopped


def test_recursive_watch_follows_new_directories(t, tmp_path: Path) -> None:
    d = tmp_path / "r"
    (d / "old").mkdir(parents=True)
    w = t.watch(str(d), recursive=True)
    (d / "old" / "f").write_text("1")
    # A directory filled before its watch could be added: its entries are reported.
    os.makedirs(d / "new" / "inner")
    (d / "new" / "inner" / "g").write_text("2")
    want = [("create", f"{d}/old/f"), ("create", f"{d}/new"), ("create", f"{d}/new/inner/g")]
    got = _wait_events(w, want)
    assert all(e in got for e in want), got
    w.stop()


def test_watch_errors_are_typed(t, tmp_path: Path) -> None:
    with pytest.raises(GuestFileNotFoundError):
        t.watch(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AgentError, match="watch"):
        t.watch(str(tmp_path / "file"))


def test_unread_events_are_bounded_and_overflow_is_reported(t, tmp_path: Path) -> None:
    """A guest can change files faster than anyone reads: the host keeps WATCH_QUEUE
    events, the last one "overflow"; the agent never buffers more than its channel holds."""
    d = tmp_path / "flood"
    d.mkdir()
    w = t.watch(str(d))
    for i in range(WATCH_QUEUE // 2 + 100):  # two events per file: over the cap
        (d / f"f{i}").write_bytes(b"")
        (d / f"f{i}").chmod(0o600)
    last, end = -1, time.monotonic() + 30
    while (w.queued != last or w.queued == 0) and time.monotonic() < end:
        last = w.queued
        time.sleep(0.5)
    events = w.pending()
    assert len(events) == WATCH_QUEUE and events[-1] == ("overflow", "")
    assert events[:2] == [("create", f"{d}/f0"), ("chmod", f"{d}/f0")] or events[0] == ("create", f"{d}/f0")
    w.stop()


def test_watch_ends_with_its_session(t, agent, tmp_path: Path) -> None:
    w = t.watch(str(tmp_path))
    t.close()
    with pytest.raises(TransportError):
        w.get(2)
    assert w.stopped
    fds = os.listdir(f"/proc/{agent.pid}/fd")
    kinds = [os.readlink(f"/proc/{agent.pid}/fd/{f}") for f in fds]
    assert not any("inotify" in k for k in kinds), kinds  # the agent closed the watch
