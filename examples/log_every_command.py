"""Seed example (callbacks guide): log every command an agent runs."""

from smolvm import Callback, SmolVM


class AuditLog(Callback):
    def on_post_run(self, ctx):
        print(f"[{ctx.vm_id}] {ctx.command!r} -> exit={ctx.result.exit_code}")

    def on_run_error(self, ctx):
        print(f"[{ctx.vm_id}] {ctx.command!r} errored: {ctx.error}")


with SmolVM(callbacks=[AuditLog()]) as vm:
    vm.run("uname -r")
