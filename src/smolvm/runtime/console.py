"""The guest's serial console on the host: capped, rotated files, never read whole.

The guest writes to its console as fast as it likes (``cat /dev/zero > /dev/console``), so
the VMM writes into a FIFO and ``multilog`` (daemontools, Debian) keeps at most
:data:`FILES` files of :data:`FILE_BYTES` each in ``<vm_dir>/console/``: ``current`` plus
older ``@<tai64n>.s``/``.u`` files, oldest removed first. multilog exits when the VMM's end
of the FIFO closes, after writing what was left in it, so a crash's last lines are kept.

Readers (:func:`tail`, :func:`read_lines`, ``smolvm logs``) seek from the end; no reader
loads more than it returns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from smolvm import procs
from smolvm.exceptions import BackendError
from smolvm.state import StateStore

#: Bytes per console file, and files kept: the console of one VM never takes more than
#: FILE_BYTES * FILES on disk (SMOLVM_CONSOLE_FILE_BYTES: 4096 .. 16777215).
FILE_BYTES = 1024 * 1024
FILES = 4
#: The legacy single-file log (VMs started by SmolVM before the cap): read as the oldest.
LEGACY = "serial.log"


def file_bytes() -> int:
    raw = os.environ.get("SMOLVM_CONSOLE_FILE_BYTES")
    return min(max(int(raw), 4096), 16777215) if raw else FILE_BYTES


def cap_bytes() -> int:
    """Most bytes the console of one VM keeps on disk."""
    return file_bytes() * FILES


def console_dir(vm_dir: Path) -> Path:
    return vm_dir / "console"


def fifo_path(vm_dir: Path) -> Path:
    return vm_dir / "console.fifo"


def _tai64n(t: float) -> str:
    sec = int(t)
    return f"@{(1 << 62) + 10 + sec:016x}{int((t - sec) * 1e9):08x}"


def files(vm_dir: Path) -> list[Path]:
    """The console's files, oldest first."""
    d = console_dir(vm_dir)
    out = [vm_dir / LEGACY] if (vm_dir / LEGACY).exists() else []
    if d.is_dir():
        out += sorted(p for p in d.iterdir() if p.name.startswith("@"))
        if (d / "current").exists():
            out.append(d / "current")
    return out


def start(state: StateStore, vm_id: str, vm_dir: Path) -> int:
    """Start the VM's console writer (recorded as a helper) on a fresh ``current`` file.
    Returns a write end of the FIFO: keep it open until the VMM has opened the FIFO (so
    multilog sees no end of input before), then close it."""
    multilog = shutil.which("multilog")
    if multilog is None:
        raise BackendError("multilog is missing: apt-get install daemontools (or `smolvm setup`)")
    d = console_dir(vm_dir)
    d.mkdir(mode=0o700, exist_ok=True)
    if (d / "current").exists():  # last boot's log: an unfinished file in multilog's naming
        os.replace(d / "current", d / f"{_tai64n(time.time())}.u")
    fifo = fifo_path(vm_dir)
    state.add_resource(vm_id, "file", str(fifo))
    if not fifo.exists():
        os.mkfifo(fifo, 0o600)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        w = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        os.set_blocking(r, True)
        p = subprocess.Popen(
            [multilog, f"s{file_bytes()}", f"n{FILES}", str(d)],
            stdin=r,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is not for it
        )
    finally:
        os.close(r)
    state.add_resource(vm_id, "helper", procs.process_token(p.pid))
    return w


def wait_written(state: StateStore, vm_id: str, timeout: float = 1.0) -> None:
    """After the VMM exited: wait (up to ``timeout`` s) until the console writer has written
    what was left in the FIFO and exited."""
    for r in state.resources(vm_id, "helper"):
        pid, _, _ = r["value"].partition(":")
        if procs.command_name(int(pid)) == "multilog":
            procs.wait_gone(int(pid), timeout, r["value"])


def tail(vm_dir: Path, n: int = 4000) -> bytes:
    """The last ``n`` bytes of the console (across its files)."""
    chunks: list[bytes] = []
    want = n
    for path in reversed(files(vm_dir)):
        if want <= 0:
            break
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - want))
                data = f.read(want)
        except OSError:
            continue
        chunks.append(data)
        want -= len(data)
    return b"".join(reversed(chunks))


def last_lines(vm_dir: Path, lines: int, block: int = 65536) -> bytes:
    """The last ``lines`` lines, reading back from the end a block at a time."""
    if lines <= 0:
        return b""
    n = block
    while True:
        data = tail(vm_dir, n)
        parts = data.splitlines(keepends=True)
        if len(parts) > lines or len(data) < n:
            return b"".join(parts[-lines:])
        n *= 4


def chunks(vm_dir: Path, size: int = 65536) -> Iterator[bytes]:
    """The whole console, oldest first, ``size`` bytes at a time (bounded by the cap)."""
    for path in files(vm_dir):
        try:
            with open(path, "rb") as f:
                while data := f.read(size):
                    yield data
        except OSError:
            continue
