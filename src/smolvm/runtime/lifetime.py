"""Lifetimes: a sandbox owned by a process ends with that process, even after SIGKILL.

An owned VM's row names its owner (``pid:starttime``) from the moment it is inserted
(:func:`owning` sets it for everything created inside it: new VMs, clones, pool hand-outs).
Before the first owned VM of a process in a data dir, that process's *watchdog* is
recorded (``watchdogs`` table) and started: a small Python process (``watchdog.py``, run
with ``-I -S``; a few MiB while it waits) blocked on a pidfd of its parent. When the owner
exits — normally, by an exception or by SIGKILL — the watchdog kills the owner's VMMs and
helpers at once, then deletes those VMs as ``delete()`` would (TAPs, nft rules, overlays,
sockets, ports, rows), and its pools' idle VMs too. ``reconcile()`` does the same for an
owner whose watchdog is gone as well (:func:`reap_dead_owners`).

Detached VMs (``SmolVM(detached=True)``, VMs made by ``SmolVMManager`` or the CLI) have no
owner and live until deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

from smolvm import procs
from smolvm.exceptions import SmolVMError, VMNotFoundError
from smolvm.runtime import resources
from smolvm.state import StateStore

log = logging.getLogger(__name__)

_OWNER: ContextVar[str | None] = ContextVar("smolvm_owner", default=None)
_lock = threading.Lock()
_dog: subprocess.Popen[bytes] | None = None
_dog_owner: str | None = None
_watched: set[str] = set()
#: Bytes of watchdog.log kept (it is cut to nothing beyond this when a watchdog starts).
LOG_CAP = 1024 * 1024


class Machines(Protocol):
    data_dir: Path
    socket_dir: Path
    state: StateStore

    def delete(self, vm_id: str) -> None: ...


def owner_token(pid: int | None = None) -> str:
    """This process's (or ``pid``'s) ``pid:starttime`` token."""
    return procs.process_token(pid or os.getpid())


def alive(token: str | None) -> bool:
    if not token:
        return False
    try:
        return procs.is_alive(int(token.split(":", 1)[0]), token)
    except ValueError:
        return False


def current_owner() -> str | None:
    """The owner token VMs created now get (None: detached)."""
    return _OWNER.get()


@contextmanager
def owning(rt: Machines, enabled: bool = True) -> Iterator[str | None]:
    """Everything created inside is owned by this process (a no-op when not ``enabled``)."""
    if not enabled:
        yield None
        return
    token = ensure_watchdog(rt)
    reset = _OWNER.set(token)
    try:
        yield token
    finally:
        _OWNER.reset(reset)


def ensure_watchdog(rt: Machines) -> str:
    """Make sure this process's watchdog runs and watches ``rt``'s data dir (recorded in
    its state store first); returns this process's owner token. One watchdog per process
    serves every data dir it uses."""
    global _dog, _dog_owner
    owner = owner_token()
    key = str(rt.data_dir)
    with _lock:
        if _dog is None or _dog_owner != owner or _dog.poll() is not None:
            _dog, _dog_owner = None, owner  # first use, or a forked child: a watchdog of its own
            _watched.clear()
        if key in _watched:
            return owner
        rt.state.add_watchdog(owner)
        if _dog is None:
            _dog = _spawn(rt.data_dir, owner)
        rt.state.set_watchdog(owner, procs.process_token(_dog.pid))
        assert _dog.stdin is not None
        _dog.stdin.write(json.dumps([str(rt.data_dir), str(rt.socket_dir)]).encode() + b"\n")
        _dog.stdin.flush()
        _watched.add(key)
    return owner


def _spawn(data_dir: Path, owner: str) -> subprocess.Popen[bytes]:
    logf = data_dir / "watchdog.log"
    if logf.exists() and logf.stat().st_size > LOG_CAP:
        logf.unlink()
    env = {**os.environ, "SMOLVM_WATCHDOG_PATH": json.dumps(sys.path)}
    with open(logf, "ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-I",  # nothing from the environment or cwd on sys.path until it needs it
                "-S",
                str(Path(__file__).with_name("watchdog.py")),
                str(os.getpid()),
                owner,
            ],
            stdin=subprocess.PIPE,  # data dirs to watch, one JSON line each
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C or hang-up is not for it
        )


def reap(rt: Machines, owner: str) -> list[str]:
    """Delete every VM that ends with ``owner`` (its VMMs killed first, all of them, so
    none runs on while the others are cleaned up); returns their ids."""
    recs = rt.state.owned_vms(owner)
    for rec in recs:
        resources.kill_processes(rt.state, rec.vm_id)
    for snap in rt.state.list_snapshots():  # ones the owner was still writing
        if not snap.complete and snap.meta.get("owner") == owner:
            shutil.rmtree(snap.path, ignore_errors=True)
            rt.state.delete_snapshot(snap.name)
    gone = []
    for rec in recs:
        try:
            rt.delete(rec.vm_id)
            gone.append(rec.vm_id)
        except VMNotFoundError:
            pass
        except SmolVMError as exc:
            log.warning("could not remove %s of dead owner %s: %s", rec.vm_id, owner, exc)
    return gone


def reap_dead_owners(rt: Machines) -> list[str]:
    """For reconcile: reap owners that are gone and whose watchdog is gone too (one that
    still runs is doing it); returns the VMs removed."""
    gone: list[str] = []
    for owner in rt.state.owners():
        if alive(owner):
            continue
        dog = rt.state.watchdog(owner)
        if dog and alive(dog):
            continue
        gone += reap(rt, owner)
        rt.state.remove_watchdog(owner)
    return gone


def status(rt: Machines) -> list[dict[str, Any]]:
    """Owners known to the state store: token, alive, watchdog token, watchdog alive."""
    out = []
    for owner in rt.state.owners():
        dog = rt.state.watchdog(owner)
        out.append({"owner": owner, "alive": alive(owner), "watchdog": dog, "watchdog_alive": alive(dog)})
    return out
