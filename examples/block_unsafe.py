"""Seed example (callbacks guide): the second run raises CommandBlockedError by design."""

from smolvm import Callback, CommandBlockedError, SmolVM


class SafetyGuard(Callback):
    DENY = ("rm -rf /", "mkfs", ":(){ :|:& };:")

    def on_pre_run(self, ctx):
        if any(bad in ctx.command for bad in self.DENY):
            raise CommandBlockedError(
                f"Blocked unsafe command: {ctx.command!r}",
                vm_id=ctx.vm_id,
                command=ctx.command,
            )


with SmolVM(callbacks=[SafetyGuard()]) as vm:
    vm.run("echo hello")  # runs normally
    vm.run("rm -rf /")  # raises CommandBlockedError; never reaches the guest
