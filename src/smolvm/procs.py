"""Process identity checks that survive pid reuse: a pid plus its start time."""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def process_token(pid: int) -> str:
    return f"{pid}:{start_time(pid)}"


def is_alive(pid: int | None, token: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, is the same process as ``token``."""
    if not pid:
        return False
    f = _stat_fields(pid)
    if f is None or f[0] in ("Z", "X"):
        return False
    if token:
        want = token.split(":", 1)[1]
        return want == "None" or want == f[19]
    return True


def wait_gone(pid: int, timeout: float, token: str | None = None) -> bool:
    """True once ``pid`` has exited (or is another process than ``token``), False after
    ``timeout`` seconds. Waits on a pidfd, so it returns as soon as the process is gone."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already gone, or a kernel without pidfds (< 5.3): poll /proc
        fd = -1
    if fd >= 0:
        try:
            # Checked after opening, so the pidfd refers to the process the token names.
            if not is_alive(pid, token):
                return True
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.poll(max(0.0, timeout) * 1000)
            return not is_alive(pid, token)
        finally:
            os.close(fd)
    while is_alive(pid, token):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def kill(pid: int, token: str | None = None, sig: int = signal.SIGKILL) -> None:
    if is_alive(pid, token):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def command_name(pid: int) -> str | None:
    """The process's command name (``/proc/PID/comm``), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
