"""Command-lifecycle callbacks: a veto hook before each command and two observers after."""

from __future__ import annotations

from dataclasses import dataclass

from smolvm.types import CommandResult


@dataclass
class RunContext:
    """Passed to every hook for a single ``SmolVM.run()`` call."""

    vm_id: str
    command: str
    shell: str
    timeout: int
    result: CommandResult | None = None
    error: Exception | None = None


class Callback:
    """Base class for command-lifecycle callbacks. Override only the hooks you need."""

    def on_pre_run(self, ctx: RunContext) -> None:
        """Called before the command is sent. Raising aborts the command (veto)."""

    def on_post_run(self, ctx: RunContext) -> None:
        """Called after the command completed; ``ctx.result`` is set. Errors are swallowed."""

    def on_run_error(self, ctx: RunContext) -> None:
        """Called when the transport raised; ``ctx.error`` is set. Errors are swallowed."""


__all__ = ["Callback", "RunContext"]
