"""``smolvm demo`` and ``smolvm version``."""

from __future__ import annotations

import platform
import sys
import time
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import CLIError, emit_json, err, out

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


# ---------------------------------------------------------------------- demo
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the VM running afterwards (prints its id).")
    ] = False,
) -> None:
    """Build the default image if needed, boot a sandbox, run two commands, clean up."""
    from smolvm.cli.images import ensure_image
    from smolvm.smolvm import SmolVM

    t_all = time.monotonic()
    art = ensure_image(quiet_if_ready=False)
    t0 = time.monotonic()
    vm = SmolVM(VMConfig_for(art), data_dir=common.OPTS.data_dir, backend=common.OPTS.backend)
    err.print(f"created sandbox [bold]{vm.vm_id}[/] in {(time.monotonic() - t0) * 1000:.0f} ms; booting…")
    timings: list[float] = []
    t_boot = 0.0
    try:
        t0 = time.monotonic()
        vm.start(boot_timeout=60)
        t_boot = time.monotonic() - t0
        info = vm.info
        err.print(
            f"booted in [bold]{t_boot:.2f} s[/] (accelerator {info.accelerator}: "
            f"{common.esc(info.accelerator_reason or '')})"
        )
        for cmd in ("echo 'Hello from SmolVM'", "uname -a"):
            t0 = time.monotonic()
            res = vm.run(cmd, timeout=30)
            timings.append(time.monotonic() - t0)
            out.print(f"[bold cyan]$ {common.esc(cmd)}[/]")
            sys.stdout.write(res.stdout)
            sys.stdout.flush()
            if res.stderr:
                sys.stderr.write(res.stderr)
            err.print(f"[dim]  exit {res.exit_code} in {timings[-1] * 1000:.0f} ms via {vm.channel}[/]")
            if not res.ok:
                raise CLIError(f"demo command {cmd!r} failed with exit code {res.exit_code}")
    except BaseException:
        vm.__exit__(None, None, None)  # owned VM: deleted
        raise
    if keep:
        vm.close()  # release handles only: the VM keeps running
        err.print(f"kept {vm.vm_id}: `smolvm run {vm.vm_id} -- CMD`, then `smolvm delete --force {vm.vm_id}`")
        out.print(vm.vm_id, markup=False)
        return
    t0 = time.monotonic()
    vm.__exit__(None, None, None)  # owned VM: deleted
    err.print(
        f"deleted in {(time.monotonic() - t0) * 1000:.0f} ms; total {time.monotonic() - t_all:.1f} s "
        f"(boot {t_boot:.2f} s, commands {', '.join(f'{x * 1000:.0f} ms' for x in timings)})"
    )


def VMConfig_for(art: Any) -> Any:
    from smolvm.types import VMConfig

    return VMConfig(kernel_path=art.kernel, rootfs_path=art.rootfs)


# ---------------------------------------------------------------------- version
def version_text() -> str:
    from smolvm import __version__

    return __version__


def version(json_out: JsonOpt = False) -> None:
    """Print the versions of smolvm, Python and QEMU."""
    from smolvm.backends.qemu import qemu_binary
    from smolvm.cli.doctor import version_line

    q = qemu_binary()
    qv = version_line([q, "--version"]) if q else None
    d = {"smolvm": version_text(), "python": platform.python_version(), "qemu": qv}
    if json_out:
        emit_json(d)
        return
    out.print(f"smolvm {d['smolvm']}\npython {d['python']}\nqemu   {qv or 'not installed'}", markup=False)
