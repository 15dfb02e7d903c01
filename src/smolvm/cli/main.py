"""The ``smolvm`` command: disposable microVMs for AI agents, from the shell.

Entry point ``smolvm = "smolvm.cli.main:app"``; also ``python -m smolvm.cli.main``.
Commands live in sibling modules; this one wires them up and owns error handling.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from smolvm.cli import (
    audit,
    common,
    demo,
    doctor,
    execution,
    fleet,
    images,
    mcp_server,
    ports,
    setup,
    shell,
    snapshots,
    vms,
)
from smolvm.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, OPTS, err

try:  # recent typer vendors click as typer._click; older releases use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exc  # type: ignore[no-redef]  # same module, old home


class SmolGroup(TyperGroup):
    """Root command group: maps exceptions to one-line errors and exit codes."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (click_exc.ClickException, typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            raise typer.Exit(common.report_error(exc)) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.get("standalone_mode", True)
        kwargs["standalone_mode"] = False  # errors are reported here, not by click
        if not standalone_mode:
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, **kwargs)
        except click_exc.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "smolvm"
            err.print(f"[bold red]error:[/] {common.esc(exc.format_message())}")
            err.print(f"[dim]see `{common.esc(cmd)} --help`[/]")
            sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
        except click_exc.ClickException as exc:
            err.print(f"[bold red]error:[/] {common.esc(exc.format_message())}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("[yellow]aborted[/]")
            sys.exit(1)
        except OSError as exc:  # e.g. EPIPE when piped into `head`
            import errno

            if exc.errno == errno.EPIPE:
                sys.exit(1)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="smolvm",
    cls=SmolGroup,
    help="Disposable, hardware-isolated Linux microVMs for AI agents.\n\n"
    "Quick start: `smolvm demo`, or `smolvm run --rm -- uname -a`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_cb(value: bool) -> None:
    if value:
        common.out.print(f"smolvm {demo.version_text()}", markup=False)
        raise typer.Exit(0)


@app.callback()
def root(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="SMOLVM_DATA_DIR",
            show_envvar=True,
            help="State directory (database, disks, VM dirs). Default: $SMOLVM_DATA_DIR, "
            "~/.local/state/smolvm, /var/lib/smolvm (first writable).",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            envvar="SMOLVM_BACKEND",
            show_envvar=True,
            help="Hypervisor: auto (default), qemu or firecracker.",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and debug logs (also SMOLVM_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_cb, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options apply to every command."""
    if backend is not None:
        from smolvm.backends import BACKENDS

        if backend not in BACKENDS:
            raise common.usage_error(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    OPTS.debug = OPTS.debug or debug
    common.configure_logging(OPTS.debug)
    if data_dir is not None:
        OPTS.data_dir = data_dir.expanduser()
        # Everything resolved later in this process (KVM probe cache, image builder,
        # audit log) must agree with the manager on the data dir.
        os.environ["SMOLVM_DATA_DIR"] = str(OPTS.data_dir)
    if backend is not None:
        OPTS.backend = backend
        os.environ["SMOLVM_BACKEND"] = backend


LIFECYCLE, COMMANDS, HOST, MORE = "VM lifecycle", "Inside a VM", "Host and images", "More"

app.command("create", rich_help_panel=LIFECYCLE)(vms.create)
app.command("start", rich_help_panel=LIFECYCLE)(vms.start)
app.command("stop", rich_help_panel=LIFECYCLE)(vms.stop)
app.command("delete", rich_help_panel=LIFECYCLE)(vms.delete)
app.command("pause", rich_help_panel=LIFECYCLE)(vms.pause)
app.command("resume", rich_help_panel=LIFECYCLE)(vms.resume)
app.command("list", rich_help_panel=LIFECYCLE)(vms.list_vms)
app.command("info", rich_help_panel=LIFECYCLE)(vms.show_info)
app.command("logs", rich_help_panel=LIFECYCLE)(vms.logs)
app.command("reconcile", rich_help_panel=LIFECYCLE)(vms.reconcile)
app.command("prune", rich_help_panel=LIFECYCLE)(vms.prune)

app.command("run", rich_help_panel=COMMANDS)(execution.run)
app.command("ssh", rich_help_panel=COMMANDS)(vms.ssh)
app.command("shell", rich_help_panel=COMMANDS)(shell.shell)
app.command("cp", rich_help_panel=COMMANDS)(execution.cp)
app.add_typer(execution.env_app, name="env", rich_help_panel=COMMANDS)
app.add_typer(ports.port_app, name="port", rich_help_panel=COMMANDS)
app.command("audit", rich_help_panel=COMMANDS)(audit.audit)

app.command("setup", rich_help_panel=HOST)(setup.setup)
app.command("doctor", rich_help_panel=HOST)(doctor.doctor)
app.add_typer(images.image_app, name="image", rich_help_panel=HOST)

app.add_typer(snapshots.snapshot_app, name="snapshot", rich_help_panel=MORE)
app.command("demo", rich_help_panel=MORE)(demo.demo)
app.command("mcp", rich_help_panel=MORE)(mcp_server.command)
app.add_typer(fleet.fleet_app, name="fleet", rich_help_panel=MORE)
app.command("version", rich_help_panel=MORE)(demo.version)


def main() -> None:
    app()


if __name__ == "__main__":
    app(prog_name="smolvm")
