"""A process's watchdog (see :mod:`smolvm.runtime.lifetime`).

Run as a script (``python -I -S watchdog.py OWNER_PID OWNER_TOKEN``), fed the data dirs to
watch on stdin (one JSON ``[data_dir, socket_dir]`` line each). It imports only the
standard library until its owner has exited, so waiting costs a few MiB and no CPU; then,
for data dirs where the owner left VMs, it imports SmolVM (``SMOLVM_WATCHDOG_PATH``: the
owner's sys.path) and removes them.
"""

from __future__ import annotations

import json
import os
import select
import sqlite3
import sys
from pathlib import Path


def watch(pid: int) -> list[list[str]]:
    """Collect registrations until process ``pid`` (our parent) exits; returns them."""
    dirs: list[list[str]] = []
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = -1  # already gone
    if fd >= 0 and os.getppid() != pid:
        os.close(fd)  # the owner died before the pidfd was opened: ours names another process
        fd = -1
    buf = b""
    stdin = sys.stdin.fileno()
    while fd >= 0:
        readable, _, _ = select.select([fd, stdin] if stdin >= 0 else [fd], [], [])
        if stdin in readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                stdin = -1  # closed: no more registrations, keep watching
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                dirs.append(json.loads(line))
        if fd in readable:  # a pidfd turns readable when its process exits
            os.close(fd)
            fd = -1
    if stdin >= 0:  # registrations written just before the owner died
        os.set_blocking(stdin, False)
        try:
            buf += os.read(stdin, 1 << 20)
        except BlockingIOError:
            pass
        dirs += [json.loads(line) for line in buf.split(b"\n") if line.strip()]
    return dirs


def left_behind(data_dir: str, owner: str) -> bool:
    """Whether ``owner`` left VMs in ``data_dir`` (a read of the state store with the
    standard library, so a process that cleaned up after itself costs no SmolVM import)."""
    try:
        db = sqlite3.connect(f"file:{data_dir}/state.db?mode=ro", uri=True, timeout=30)
        try:
            row = db.execute(
                "SELECT 1 FROM vms WHERE owner=? OR (pool IS NOT NULL AND pool_owner=?) UNION ALL "
                "SELECT 1 FROM snapshots WHERE json_extract(meta, '$.owner')=? "
                "AND NOT json_extract(meta, '$.complete') LIMIT 1",
                (owner, owner, owner),
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return True  # let SmolVM look (and report)
    return row is not None


def main(argv: list[str]) -> int:
    owner_pid, owner = int(argv[1]), argv[2]
    dirs = watch(owner_pid)
    todo = [d for d in dirs if left_behind(d[0], owner)]
    if todo:
        sys.path[:] = json.loads(os.environ.get("SMOLVM_WATCHDOG_PATH", "[]")) or sys.path
        # Only now, and only when there is work: waiting costs no SmolVM import.
        from smolvm.runtime import lifetime  # after sys.path is set
        from smolvm.runtime.machines import Runtime  # after sys.path is set

        for data_dir, socket_dir in todo:
            with Runtime(Path(data_dir), Path(socket_dir)) as rt:
                gone = lifetime.reap(rt, owner)
                rt.state.remove_watchdog(owner)
            print(f"smolvm watchdog: {owner} exited; removed {' '.join(gone) or 'nothing'}", file=sys.stderr)
    for d in dirs:
        if d not in todo:
            _forget(d[0], owner)
    return 0


def _forget(data_dir: str, owner: str) -> None:
    try:
        db = sqlite3.connect(f"{data_dir}/state.db", timeout=30)
        try:
            with db:
                db.execute("DELETE FROM watchdogs WHERE owner=?", (owner,))
        finally:
            db.close()
    except sqlite3.Error:
        pass  # reconcile() removes it


if __name__ == "__main__":
    sys.exit(main(sys.argv))
