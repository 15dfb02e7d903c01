"""The README's main job: build the default image (first run only), boot a sandbox, run a
command inside it and print its output."""

import time

from smolvm import SmolVM

t0 = time.monotonic()
with SmolVM() as vm:
    print(vm.run("echo 'Hello from SmolVM'").output)
    print(vm.run("uname -sr").output)
    print(f"[{vm.vm_id}: accelerator {vm.info.accelerator}, {time.monotonic() - t0:.1f} s total]")
