"""Is the VM what its row says? Liveness of VMMs, crash reports, marking the dead.

A row saying running or paused is only true while its VMM process (pid + start time, from
the resource ledger) lives: :func:`checked` — run by every ``get()``/``list_vms()`` —
records a VM whose VMM died as ERROR (cheap: one /proc read per running VM).
"""

from __future__ import annotations

from typing import Protocol

from smolvm import procs
from smolvm.backends.base import LaunchSpec, socket_files
from smolvm.exceptions import VMNotFoundError
from smolvm.runtime import console, resources
from smolvm.state import StateStore
from smolvm.state.records import VMRecord
from smolvm.types import VMState

#: Console lines that name a guest crash (the first one found is its headline).
CRASH_MARKERS = ("Kernel panic", "BUG:", "Oops", "general protection fault", "sysrq", "Out of memory")
LIVE = (VMState.RUNNING, VMState.PAUSED)


class Machines(Protocol):
    state: StateStore

    def spec(self, rec: VMRecord) -> LaunchSpec: ...

    def fail(self, vm_id: str, reason: str) -> None: ...

    def serial_tail(self, vm_id: str, n: int = 4000) -> str: ...


def checked(
    rt: Machines, rec: VMRecord, tokens: dict[str, str] | None = None, why: str = "VM process is gone"
) -> VMRecord | None:
    """``rec``, or — if it says running/paused but its VMM is gone — the row after marking
    the VM ERROR (its sockets and helpers removed); None if it was deleted meanwhile.
    ``tokens``: vm_id -> process token of many VMs, read in one query (:func:`process_tokens`)."""
    if rec.status not in LIVE:
        return rec
    token = tokens.get(rec.vm_id) if tokens is not None else resources.process_token(rt.state, rec.vm_id)
    if procs.is_alive(rec.pid, token):
        return rec
    try:
        fresh = rt.state.get_vm(rec.vm_id)
        if fresh.status not in LIVE or fresh.pid != rec.pid:
            return fresh  # stopped or restarted meanwhile
        _mark(rt, fresh, token, why)
        return rt.state.get_vm(rec.vm_id)
    except VMNotFoundError:
        return None  # another process deleted it (its VMM first) while we looked


def process_tokens(state: StateStore) -> dict[str, str]:
    """vm_id -> recorded VMM process token, for every VM (one query)."""
    return {r["vm_id"]: r["value"] for r in state.resources(kind="process")}


def _mark(rt: Machines, rec: VMRecord, token: str | None, why: str) -> None:
    rt.state.update_vm(rec.vm_id, status=VMState.ERROR, pid=None, error=why)
    for s in socket_files(rt.spec(rec)):
        s.unlink(missing_ok=True)
        rt.state.remove_resource("socket", str(s))
    if token:
        rt.state.remove_resource("process", token)
    for r in rt.state.resources(rec.vm_id, "helper"):
        resources.remove(rt.state, r)  # the VMM's uplink and console die with it; make sure


def mark_dead(rt: Machines) -> list[str]:
    """Mark VMs whose VMM died as ERROR and clear their sockets; returns their ids."""
    tokens = process_tokens(rt.state)
    stale = []
    for rec in rt.state.list_vms():
        now = checked(rt, rec, tokens, "VM process is gone (found by reconcile)")
        if rec.status in LIVE and now is not None and now.status is VMState.ERROR:
            stale.append(rec.vm_id)
    return stale


def crash_report(rt: Machines, vm_id: str, grace: float = 1.5) -> str | None:
    """After a channel failed: if the VM's VMM has exited (or does within ``grace``
    seconds, e.g. after a guest kernel panic), mark the VM ERROR and return what the
    console says: the crash's headline (the first "Kernel panic", "BUG:", "Oops" or
    "sysrq" line) and the console's tail; None while it still runs."""
    rec = rt.state.get_vm(vm_id)
    if rec.status not in LIVE or not rec.pid:
        return None
    token = resources.process_token(rt.state, vm_id)
    if not procs.wait_gone(rec.pid, grace, token):
        return None
    console.wait_written(rt.state, vm_id)
    log_tail = rt.serial_tail(vm_id, 16000)
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    found = ((ln, ln.find(m)) for ln in lines for m in CRASH_MARKERS if m in ln)
    # From the marker on (a guest may glue its own output to the line), at most 300 chars.
    headline = next((ln[max(0, i - 20) :] for ln, i in found), lines[-1] if lines else "")[:300]
    rt.fail(vm_id, f"guest crashed: {headline}")
    return f"{headline}\n...\n{log_tail[-1500:]}"
