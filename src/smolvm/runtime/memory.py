"""Guest RAM of QEMU VMs: a shared file in /dev/shm, so snapshots copy it instead of
streaming RAM (see ``smolvm.snapshots``)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from smolvm.backends.base import MemorySpec
from smolvm.envflags import env_flag
from smolvm.state import StateStore

SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"/smolvm-[A-Za-z0-9_-]+\.mem( \(deleted\))?$")


def shared_memory_available() -> bool:
    """Guest RAM can be a shared file (``SMOLVM_SHARED_MEMORY=0`` turns it off)."""
    if not env_flag("SMOLVM_SHARED_MEMORY", True):
        return False
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def boot_memory(state: StateStore, vm_id: str) -> MemorySpec:
    """RAM for a booting QEMU VM: a shared file in /dev/shm (recorded before QEMU creates it,
    unlinked as soon as QEMU has it open), or anonymous RAM under the same RAMBlock id."""
    if not shared_memory_available():
        return MemorySpec(path=None)
    path = SHM_DIR / f"smolvm-{vm_id}-{secrets.token_hex(4)}.mem"
    state.add_resource(vm_id, "file", str(path))
    # Created here, 0600 and exclusively (/dev/shm is world-writable: nobody may plant a
    # symlink or read the guest's RAM); QEMU sizes the existing file.
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return MemorySpec(path=path, shared=True, unlink=True)


def shared_memory_fd(pid: int | None) -> Path | None:
    """``/proc/<pid>/fd/<n>`` of the VMM's shared RAM file, if its RAM is one."""
    if not pid:
        return None
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    for e in entries:
        try:
            target = os.readlink(e)
        except OSError:
            continue
        if target.startswith(str(SHM_DIR) + "/") and _SHM_NAME.search(target):
            return e
    return None
