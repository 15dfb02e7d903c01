"""Seed example (callbacks guide): attach a callback to an existing sandbox."""

from smolvm import Callback, SmolVM


class HelloHook(Callback):
    def on_pre_run(self, ctx):
        print(f"about to run: {ctx.command}")


vm = SmolVM()
vm.add_callback(HelloHook())
vm.start()
vm.run("echo hi")
vm.stop()
vm.delete()
vm.close()
