"""Callbacks: a veto hook before each command and two observers after, plus a veto and an
observer hook around every other guest-facing operation (file transfers, env changes,
start/stop/snapshot/delete), and their dispatch. Dispatch runs in the ``SmolVM`` facade,
before a transport is chosen, so the agent and SSH channels behave identically. ``spawn``
goes through ``on_pre_run`` like ``run``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from smolvm.types import CommandResult

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunContext:
    """Passed to every hook for a single ``SmolVM.run()`` call."""

    vm_id: str
    command: str
    shell: str
    #: Seconds for the whole command (None: no limit; 0 for ``spawn``).
    timeout: float | None
    result: CommandResult | None = None
    error: Exception | None = None
    #: The rest of the request, so a guard sees all of it (None when not given): extra
    #: environment variables, working directory, bytes fed to the command's stdin.
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: bytes | None = None


@dataclass
class FileContext:
    """A file operation: ``direction`` "upload" (host -> guest), "download" or "watch";
    ``mode`` the permission bits asked for (uploads), ``size`` in bytes (uploads: before;
    downloads: after, in post hooks)."""

    vm_id: str
    direction: str
    guest_path: str
    local_path: str
    mode: int | None = None
    size: int | None = None
    error: Exception | None = None


@dataclass
class EnvContext:
    """A change of the guest's persistent environment: ``set`` variables (name -> value)
    and ``unset`` names."""

    vm_id: str
    set: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    error: Exception | None = None


@dataclass
class LifecycleContext:
    """``action`` "start", "stop", "pause", "resume", "snapshot" or "delete";
    ``details`` e.g. the snapshot name."""

    vm_id: str
    action: str
    details: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None


class Callback:
    """Base class for callbacks. Override only the hooks you need."""

    def on_pre_file(self, ctx: FileContext) -> None:
        """Before a file transfer. Raising aborts it (veto)."""

    def on_post_file(self, ctx: FileContext) -> None:
        """After a transfer, done or failed (``ctx.error``). Errors are swallowed."""

    def on_pre_env(self, ctx: EnvContext) -> None:
        """Before the guest's persistent environment changes. Raising aborts it."""

    def on_post_env(self, ctx: EnvContext) -> None:
        """After an env change, done or failed (``ctx.error``). Errors are swallowed."""

    def on_pre_lifecycle(self, ctx: LifecycleContext) -> None:
        """Before start/stop/pause/resume/snapshot/delete. Raising aborts it."""

    def on_post_lifecycle(self, ctx: LifecycleContext) -> None:
        """After a lifecycle action, done or failed (``ctx.error``). Errors are swallowed."""

    def on_pre_run(self, ctx: RunContext) -> None:
        """Called before the command is sent. Raising aborts the command (veto)."""

    def on_post_run(self, ctx: RunContext) -> None:
        """Called after the command completed; ``ctx.result`` is set. Errors are swallowed."""

    def on_run_error(self, ctx: RunContext) -> None:
        """Called when the transport raised; ``ctx.error`` is set. Errors are swallowed."""


def run_with_callbacks(
    callbacks: Sequence[Callback], ctx: RunContext, execute: Callable[[], CommandResult]
) -> CommandResult:
    """Pre-run hooks may veto (their exception propagates); observers never break a run."""
    run_pre_hooks(callbacks, ctx)
    try:
        result = execute()
    except Exception as exc:
        ctx.error = exc
        for cb in callbacks:
            _observe(cb.on_run_error, ctx, "on_run_error", cb)
        raise
    ctx.result = result
    for cb in callbacks:
        _observe(cb.on_post_run, ctx, "on_post_run", cb)
    return result


def run_pre_hooks(callbacks: Sequence[Callback], ctx: RunContext) -> None:
    """The veto channel: the first exception aborts the command (after ``on_blocked``)."""
    for cb in callbacks:
        try:
            cb.on_pre_run(ctx)
        except BaseException as exc:
            _notify_blocked(callbacks, ctx, exc, cb)
            raise


def around(callbacks: Sequence[Callback], kind: str, ctx: Any, execute: Callable[[], T]) -> T:
    """``execute()`` between the ``on_pre_<kind>`` hooks (the first exception vetoes it) and
    the ``on_post_<kind>`` observers, which always run (``ctx.error`` set when it failed or
    was vetoed, so an audit log records refusals too)."""
    try:
        for cb in callbacks:
            if (pre := getattr(cb, f"on_pre_{kind}", None)) is not None:  # duck-typed ones too
                pre(ctx)
        out = execute()
    except Exception as exc:
        ctx.error = exc
        raise
    finally:
        for cb in callbacks:
            if (post := getattr(cb, f"on_post_{kind}", None)) is not None:
                _observe(post, ctx, f"on_post_{kind}", cb)
    return out


def lifecycle(action: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator of a ``SmolVM`` lifecycle method: runs it inside :func:`around` with a
    :class:`LifecycleContext` (the call's keyword arguments as ``details``)."""

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> T:
            ctx = LifecycleContext(self.vm_id, action, dict(kwargs))
            return around(self._callbacks, "lifecycle", ctx, lambda: fn(self, *args, **kwargs))

        return call

    return deco


def _observe(hook: Callable[[Any], None], ctx: Any, name: str, cb: Callback) -> None:
    try:
        hook(ctx)
    except Exception:
        log.exception(
            "%s.%s raised; ignored (observer hooks cannot affect a command)", type(cb).__name__, name
        )


def _notify_blocked(
    callbacks: Sequence[Callback], ctx: RunContext, exc: BaseException, blocker: Callback
) -> None:
    """Optional ``on_blocked(ctx, error)`` hook (e.g. AuditLog records vetoed commands)."""
    for cb in callbacks:
        hook = getattr(cb, "on_blocked", None)
        if hook is None:
            continue
        try:
            hook(ctx, exc)
        except Exception:
            log.exception("%s.on_blocked raised; ignored", type(cb).__name__)


__all__ = [
    "Callback",
    "RunContext",
    "FileContext",
    "EnvContext",
    "LifecycleContext",
    "run_with_callbacks",
    "run_pre_hooks",
    "around",
]
