"""``vm.files``: the guest's filesystem as an API (E2B-style), over the VM's command channel.

Transfers stream through the channel's upload/download (bounded, atomic, modes sanitised on
the host); metadata operations are single commands run with ``shell="raw"`` and every path
``shlex``-quoted, so they pass through the VM's callbacks (guards, audit) like any command.
"""

from __future__ import annotations

import posixpath
import shlex
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smolvm.exceptions import GuestFileNotFoundError, SmolVMError, ValidationError
from smolvm.transports.base import WatchHandle as ChannelWatch
from smolvm.types import CommandResult


class Sandbox(Protocol):
    """What :class:`Files` needs of a ``SmolVM``."""

    def run(self, command: str, timeout: float | None = 30, shell: str = "login") -> CommandResult: ...

    def upload_file(self, local_path: str | Path, guest_path: str, mode: int | None = None) -> None: ...

    def download_file(
        self, guest_path: str, local_path: str | Path, *, max_bytes: int | None = ...
    ) -> None: ...


#: Default cap of :meth:`Files.read` (bytes).
READ_LIMIT = 64 * 1024 * 1024
_KINDS = {"regular file": "file", "regular empty file": "file", "directory": "dir", "symbolic link": "link"}


@dataclass(frozen=True)
class FileInfo:
    """One directory entry. ``size`` in bytes, ``mode`` the permission bits (e.g. 0o644),
    ``mtime`` in Unix seconds, ``type`` "file", "dir", "link" or "other"."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: int


@dataclass(frozen=True)
class FilesystemEvent:
    """A change under a watched directory. ``type``: "create" (also moved in), "write",
    "remove", "rename" (moved away or renamed; the new name comes as "create"), "chmod"
    (metadata), or "overflow" (events were lost: re-list the directory; ``path`` is "")."""

    type: str
    path: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


#: Starts a watch on the VM's channel: (path, recursive, on_event) -> handle.
Watcher = Callable[[str, bool, "Callable[[str, str], object] | None"], ChannelWatch]


class WatchHandle:
    """Changes under a guest directory, from :meth:`Files.watch`. Iterate over it (blocks
    until the next event; ends after :meth:`stop`), or poll with :meth:`get` /
    :meth:`get_new_events`. A ``with`` block stops it."""

    def __init__(self, channel: ChannelWatch, path: str) -> None:
        self._ch, self.path = channel, path

    def get(self, timeout: float | None = None) -> FilesystemEvent | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one comes);
        None on timeout or once stopped."""
        ev = self._ch.get(timeout)
        return None if ev is None else FilesystemEvent(*ev)

    def get_new_events(self) -> list[FilesystemEvent]:
        """Events received since the last call, without waiting."""
        return [FilesystemEvent(*ev) for ev in self._ch.pending()]

    def __iter__(self) -> Iterator[FilesystemEvent]:
        while (ev := self.get()) is not None:
            yield ev

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self._ch.stop()

    def __enter__(self) -> WatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _abs(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValidationError(f"guest path must be absolute (start with /), got {path!r}", field="path")
    return path


class Files:
    """File operations on one sandbox's guest (``vm.files``)."""

    def __init__(self, vm: Sandbox, watcher: Watcher | None = None) -> None:
        self._vm = vm
        self._watcher = watcher

    def _sh(self, script: str, timeout: float = 60) -> str:
        r = self._vm.run(script, timeout=timeout, shell="raw")
        if r.exit_code != 0:
            msg = (r.stderr.strip() or r.stdout.strip() or f"exit {r.exit_code}")[:500]
            if "No such file" in msg:
                raise GuestFileNotFoundError(msg)
            raise SmolVMError(f"guest file operation failed: {msg}")
        return r.stdout

    def read(self, path: str, *, max_bytes: int | None = READ_LIMIT) -> bytes:
        """The file's bytes (``TransferLimitError`` beyond ``max_bytes``; None: no cap)."""
        with tempfile.TemporaryDirectory(prefix="smolvm-files-") as d:
            dest = Path(d) / "f"
            self._vm.download_file(_abs(path), dest, max_bytes=max_bytes)
            return dest.read_bytes()

    def read_text(self, path: str, encoding: str = "utf-8", *, max_bytes: int | None = READ_LIMIT) -> str:
        return self.read(path, max_bytes=max_bytes).decode(encoding)

    def write(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        """Create or replace the file (parent dirs must exist); ``mode`` default 0o644."""
        raw = data.encode() if isinstance(data, str) else data
        if not isinstance(raw, bytes):
            raise ValidationError("data must be bytes or str", field="data")
        with tempfile.NamedTemporaryFile(prefix="smolvm-files-") as f:
            f.write(raw)
            f.flush()
            self._vm.upload_file(f.name, _abs(path), mode=0o644 if mode is None else mode)

    def list(self, path: str = "/") -> list[FileInfo]:
        """Entries of directory ``path`` (hidden ones included), sorted by name."""
        q = shlex.quote(_abs(path))
        out = self._sh(
            f'cd {q} && for f in * .[!.]* ..?*; do [ -e "$f" ] || [ -L "$f" ] || continue; '
            "stat -c '%F|%s|%a|%Y|%n' -- \"$f\"; done"
        )
        base = path.rstrip("/") or ""
        infos = []
        for line in out.splitlines():
            kind, size, mode, mtime, name = line.split("|", 4)
            infos.append(
                FileInfo(
                    name, f"{base}/{name}", _KINDS.get(kind, "other"), int(size), int(mode, 8), int(mtime)
                )
            )
        return sorted(infos, key=lambda i: i.name)

    def exists(self, path: str) -> bool:
        q = shlex.quote(_abs(path))
        return self._sh(f"if [ -e {q} ] || [ -L {q} ]; then echo y; else echo n; fi").strip() == "y"

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file (or, with ``recursive``, a directory tree). Missing: not an error."""
        self._sh(f"rm -f{'r' if recursive else ''} -- {shlex.quote(_abs(path))}")

    def make_dir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        self._sh(f"mkdir {'-p ' if parents else ''}-m {mode:o} -- {shlex.quote(_abs(path))}")

    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` (replacing a file there)."""
        self._sh(f"mv -f -- {shlex.quote(_abs(src))} {shlex.quote(_abs(dst))}")

    def watch(
        self,
        path: str,
        *,
        recursive: bool = False,
        on_event: Callable[[FilesystemEvent], object] | None = None,
    ) -> WatchHandle:
        """Watch directory ``path`` (inotify in the guest agent). Returns once watching:
        every later change is reported, in order, typically within milliseconds.
        ``recursive`` follows subdirectories, including ones created later (up to 4096).
        ``on_event`` is called on the channel's reader thread for each event (keep it
        quick); events also queue on the handle (up to 10,000 unread, then "overflow")."""
        if self._watcher is None:
            raise SmolVMError("this Files object has no channel to watch with")
        cb = None if on_event is None else (lambda kind, p: on_event(FilesystemEvent(kind, p)))
        return WatchHandle(self._watcher(_abs(path), recursive, cb), path)
