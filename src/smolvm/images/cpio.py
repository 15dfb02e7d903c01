"""A minimal, deterministic writer for the cpio "newc" format the kernel unpacks."""

from __future__ import annotations

import stat
from pathlib import Path


class CpioWriter:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\x00"
        fields = [
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(nameb),
            0,
        ]
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        buf = hdr + nameb
        buf += b"\x00" * (-len(buf) % 4)
        buf += data
        buf += b"\x00" * (-len(buf) % 4)
        self._parts.append(buf)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def write(self, path: Path) -> Path:
        self._entry("TRAILER!!!", 0)
        data = b"".join(self._parts)
        data += b"\x00" * (-len(data) % 512)
        path.write_bytes(data)
        return path
