"""Command-lifecycle callbacks: a veto hook before each command and two observers after,
and their dispatch around one command. Dispatch runs in the ``SmolVM`` facade, before a
transport is chosen, so the agent and SSH channels behave identically."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smolvm.types import CommandResult

log = logging.getLogger(__name__)


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


class Callback:
    """Base class for command-lifecycle callbacks. Override only the hooks you need."""

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


def _observe(hook: Callable[[RunContext], None], ctx: RunContext, name: str, cb: Callback) -> None:
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


__all__ = ["Callback", "RunContext", "run_with_callbacks", "run_pre_hooks"]
