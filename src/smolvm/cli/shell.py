"""`smolvm shell ID`: an interactive terminal in a VM over the guest agent (no SSH)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from smolvm.cli.common import CLIError, open_vm

VmId = Annotated[str, typer.Argument(help="VM id (see `smolvm list`).", metavar="ID")]

#: After a newline, "~." ends the session from this side (as in ssh), even when the guest
#: no longer reads its terminal.
_ESCAPE = b"~."


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The local terminal in raw mode (keys go to the guest as typed); always restored."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return max(1, size.columns), max(1, size.lines)
    except OSError:
        return 80, 24


def shell(
    vm_id: VmId,
    command: Annotated[
        str | None, typer.Option("--command", "-c", help="Run this instead of a login shell.")
    ] = None,
) -> None:
    """Open a terminal in a running VM (login shell); exits with the shell's exit code.

    Window-size changes are forwarded; type `~.` at the start of a line to leave. Output is
    the guest's terminal, passed through as is: like ssh, a hostile guest can send escape
    sequences to your terminal emulator.
    """
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        raise CLIError("smolvm shell needs a terminal", "for scripts use: smolvm run ID -- COMMAND")
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    with open_vm(vm_id, running=True) as vm:
        env = {"TERM": os.environ.get("TERM", "xterm")}
        h = vm.pty(command, *_size(fd), on_data=show, env=env)
        previous: Any = signal.signal(signal.SIGWINCH, lambda *_: h.resize(*_size(fd)))
        try:
            with _raw_terminal(fd):
                _pump(fd, h)
        finally:
            signal.signal(signal.SIGWINCH, previous)
            h.close()
        code = h.wait(10).exit_code
    raise typer.Exit(code if 0 <= code < 256 else 1)


def _pump(fd: int, h: Any) -> None:
    """Keys to the guest until the session ends or the user types the escape."""
    line_start, pending = True, b""
    while h.is_running():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return
        send = b""
        for b in (data[i : i + 1] for i in range(len(data))):
            if pending or (line_start and b == b"~"):
                pending += b
                if pending == _ESCAPE:
                    return
                if not _ESCAPE.startswith(pending):
                    send, pending = send + pending, b""
            else:
                send += b
            line_start = b in (b"\r", b"\n")
        if send:
            h.write(send)
