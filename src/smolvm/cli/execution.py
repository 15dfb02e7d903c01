"""Commands that talk to a running guest: run, cp, env set|unset|list."""

from __future__ import annotations

import os
import posixpath
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import (
    EXIT_SIGPIPE,
    EXIT_TIMEOUT,
    CLIError,
    emit_json,
    err,
    open_vm,
    out,
    parse_env_pairs,
    usage_error,
)
from smolvm.types import VM_ID_RE

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
VmId = Annotated[str, typer.Argument(help="VM id (see `smolvm list`).", metavar="ID")]


# ---------------------------------------------------------------------- run
def _is_tty(stream: Any) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False


class _Sink:
    """Writes guest output to our stdout/stderr as it arrives.

    When the reader goes away (``smolvm run ID -- yes | head``) the guest command is
    stopped like SIGPIPE stops a local one: the rest is discarded and the main thread is
    signalled out of its wait; closing the channel ends the command in the guest, and
    ``run`` exits 141 (128+SIGPIPE).
    """

    broken = False

    def __init__(self, stream: Any, *, raw: bool = False) -> None:
        self.stream = stream
        # Guest output is hostile: on a terminal its control sequences are shown, not obeyed.
        self.clean = not raw and _is_tty(stream)

    def __call__(self, chunk: bytes) -> None:
        if _Sink.broken:
            return
        try:
            self.stream.write(common.neutralize(chunk) if self.clean else chunk)
            self.stream.flush()
        except BrokenPipeError:
            _Sink.broken = True
            try:  # later writes (and the flush at exit) go nowhere instead of failing
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, self.stream.fileno())
                os.close(fd)
            except (OSError, ValueError):
                pass
            # A real signal: it interrupts the main thread's blocking wait (interrupt_main
            # would only set a flag), and SIGUSR1 is not ignored like SIGINT may be.
            main_ident = threading.main_thread().ident
            if main_ident is not None:
                signal.pthread_kill(main_ident, signal.SIGUSR1)


class _PipeClosed(Exception):
    pass


def _on_pipe_closed(signum: int, frame: Any) -> None:
    raise _PipeClosed()


def _run_in(
    vm: Any,
    command: str,
    *,
    timeout: float | None,
    shell: str,
    env: dict[str, str],
    cwd: str | None,
    stdin: bytes | None,
    raw: bool = False,
) -> int:
    from smolvm.exceptions import OperationTimeoutError

    sys.stdout.flush()
    sys.stderr.flush()
    previous = signal.signal(signal.SIGUSR1, _on_pipe_closed)
    try:
        res = vm.run(
            command,
            timeout=timeout,
            shell=shell,
            env=env or None,
            cwd=cwd,
            stdin=stdin,
            on_stdout=_Sink(sys.stdout.buffer, raw=raw),
            on_stderr=_Sink(sys.stderr.buffer, raw=raw),
        )
    except OperationTimeoutError as exc:
        common.report_error(exc)
        return EXIT_TIMEOUT
    except _PipeClosed:
        return EXIT_SIGPIPE  # the caller's `finally` closes the channel: the guest command ends
    finally:
        signal.signal(signal.SIGUSR1, previous)
    if _Sink.broken:
        return EXIT_SIGPIPE
    return int(res.exit_code)


def run(
    args: Annotated[
        list[str],
        typer.Argument(
            help="ID, then the command (after `--`). With --rm: only the command.", metavar="[ID] -- CMD..."
        ),
    ],
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", "-t", help="Kill the command after S seconds (exit code 124). Default: no limit."
        ),
    ] = None,
    shell: Annotated[
        str, typer.Option("--shell", help="login (loads the profile and VM env vars) or raw.")
    ] = "login",
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for this command only (repeatable).")
    ] = None,
    cwd: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Working directory in the guest.")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--interactive", "-i", help="Send this process's stdin to the command.")
    ] = False,
    rm: Annotated[
        bool, typer.Option("--rm", help="One-shot sandbox: create a VM, run, delete it (no ID).")
    ] = False,
    mem: Annotated[int | None, typer.Option("--mem", help="With --rm: memory in MiB.", min=128)] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="With --rm: virtual CPUs.", min=1)] = None,
    boot_timeout: Annotated[
        float, typer.Option("--boot-timeout", help="With --rm: boot timeout in seconds.")
    ] = 60.0,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Pass the guest's terminal control sequences through to this terminal."),
    ] = False,
    no_audit: Annotated[
        bool, typer.Option("--no-audit", help="Do not record the command in the audit log (`smolvm audit`).")
    ] = False,
) -> None:
    """Run a command in a VM, streaming its output; exits with the command's exit code.

    One word after `--` is a shell command line (`smolvm run ID -- 'ls | wc -l'`); several
    words are quoted and joined (`smolvm run ID -- ls -la /tmp`).
    """
    if shell not in ("login", "raw"):
        raise usage_error(f"--shell must be login or raw, got {shell!r}")
    if timeout is not None and timeout <= 0:
        raise usage_error("--timeout must be > 0 seconds")
    per_cmd_env = parse_env_pairs(env)
    if rm:
        command = common.command_line(list(args))
    else:
        if (mem, vcpus) != (None, None):
            raise usage_error("--mem/--vcpus only apply with --rm")
        if len(args) < 2:
            raise usage_error(
                "expected an ID and a command", "smolvm run ID -- CMD...   or   smolvm run --rm -- CMD..."
            )
        vm_id, command = args[0], common.command_line(list(args[1:]))
    data = sys.stdin.buffer.read() if stdin else None
    callbacks = [] if no_audit else _audit_callbacks()
    try:
        if rm:
            code = _run_rm(
                command,
                timeout=timeout,
                shell=shell,
                env=per_cmd_env,
                cwd=cwd,
                stdin=data,
                mem=mem,
                vcpus=vcpus,
                boot_timeout=boot_timeout,
                callbacks=callbacks,
                raw=raw,
            )
        else:
            with open_vm(vm_id, running=True) as vm:
                for cb in callbacks:
                    vm.add_callback(cb)
                code = _run_in(
                    vm, command, timeout=timeout, shell=shell, env=per_cmd_env, cwd=cwd, stdin=data, raw=raw
                )
    finally:
        for cb in callbacks:
            cb.close()
    raise typer.Exit(code)


def _audit_callbacks() -> list[Any]:
    """The audit log as a run callback, so `smolvm audit` shows CLI commands too."""
    from smolvm.cli.audit import audit_log

    try:
        return [audit_log()]
    except Exception as exc:
        common.warn(f"audit log unavailable, command not recorded: {exc}")
        return []


def _run_rm(
    command: str, *, mem: int | None, vcpus: int | None, boot_timeout: float, callbacks: list[Any], **kw: Any
) -> int:
    from smolvm.cli.vms import build_config
    from smolvm.smolvm import SmolVM

    cfg = build_config(vm_id=None, mem=mem, vcpus=vcpus, disk=None, env=None, channel=None)
    vm = SmolVM(cfg, data_dir=common.OPTS.data_dir, backend=common.OPTS.backend, callbacks=callbacks)
    try:
        if err.is_terminal:
            with err.status(f"booting a one-shot sandbox ({vm.vm_id})…"):
                vm.start(boot_timeout=boot_timeout)
        else:
            vm.start(boot_timeout=boot_timeout)
        return _run_in(vm, command, **kw)
    finally:
        vm.__exit__(None, None, None)  # an owned VM is deleted — also on errors and Ctrl-C


# ---------------------------------------------------------------------- cp
def _split_remote(spec: str) -> tuple[str | None, str]:
    """``ID:/path`` → (ID, /path); a local path → (None, path). ``./a:b`` stays local."""
    head, sep, tail = spec.partition(":")
    if sep and VM_ID_RE.match(head) and "/" not in head:
        return head, tail
    return None, spec


def cp(
    src: Annotated[str, typer.Argument(help="Source: a local path or ID:/guest/path.")],
    dst: Annotated[str, typer.Argument(help="Destination: a local path or ID:/guest/path.")],
    mode: Annotated[
        str | None, typer.Option("--mode", help="Octal permissions for an uploaded file (default: keep).")
    ] = None,
) -> None:
    """Copy a file between the host and a VM (exactly one side is ID:/path)."""
    s_vm, s_path = _split_remote(src)
    d_vm, d_path = _split_remote(dst)
    if (s_vm is None) == (d_vm is None):
        raise usage_error(
            "exactly one of SRC and DST must be ID:/guest/path",
            "smolvm cp ./local.txt vm-1234:/tmp/   or   smolvm cp vm-1234:/etc/os-release .",
        )
    perm = None
    if mode is not None:
        try:
            perm = int(mode, 8)
        except ValueError:
            raise usage_error(f"--mode must be octal (e.g. 0755), got {mode!r}") from None
    if d_vm is not None:  # upload
        local = Path(s_path).expanduser()
        if not local.is_file():
            raise CLIError(f"{local} is not a file" if local.exists() else f"{local}: no such file")
        with open_vm(d_vm, running=True) as vm:
            guest = d_path or "."
            if guest.endswith("/") or _guest_is_dir(vm, guest):
                guest = posixpath.join(guest, local.name)
            vm.upload_file(local, guest, perm)
        err.print(f"copied {local} → {d_vm}:{guest} ({local.stat().st_size} bytes)")
    else:  # download
        assert s_vm is not None
        if not s_path:
            raise usage_error("give the guest path: ID:/path/to/file")
        local = Path(d_path).expanduser()
        if local.is_dir() or d_path.endswith("/"):
            local = local / posixpath.basename(s_path.rstrip("/"))
        with open_vm(s_vm, running=True) as vm:
            vm.download_file(s_path, local)
        err.print(f"copied {s_vm}:{s_path} → {local} ({local.stat().st_size} bytes)")


def _guest_is_dir(vm: Any, path: str) -> bool:
    return vm.run(f"test -d {shlex.quote(path)}", shell="raw", timeout=30).exit_code == 0


# ---------------------------------------------------------------------- env
env_app = typer.Typer(
    name="env",
    no_args_is_help=True,
    help="Manage a VM's persistent environment variables (for login-shell commands).",
)


def _stored_env(vm: Any) -> dict[str, str]:
    return dict(vm.refresh().config.env_vars or {})


@env_app.command("set")
def env_set(
    vm_id: VmId, pairs: Annotated[list[str], typer.Argument(help="KEY=VALUE pairs.", metavar="KEY=VALUE...")]
) -> None:
    """Set variables (merged with existing ones; survive stop/start).

    On a stopped VM they are stored and applied at the next boot."""
    new = parse_env_pairs(pairs, "env set")
    with open_vm(vm_id) as vm:
        if str(vm.refresh().status) == "running":
            allv = vm.set_env_vars(new)
        else:
            allv = {**_stored_env(vm), **new}
            vm.manager.set_config_env(vm_id, allv)
    err.print(f"{vm_id}: set {', '.join(sorted(new))} ({len(allv)} variable(s) in total)")


@env_app.command("unset")
def env_unset(
    vm_id: VmId, keys: Annotated[list[str], typer.Argument(help="Variable names.", metavar="KEY...")]
) -> None:
    """Remove variables."""
    with open_vm(vm_id) as vm:
        if str(vm.refresh().status) == "running":
            allv = vm.unset_env_vars(list(keys))
        else:
            allv = {k: v for k, v in _stored_env(vm).items() if k not in keys}
            vm.manager.set_config_env(vm_id, allv)
    err.print(f"{vm_id}: unset {', '.join(keys)} ({len(allv)} variable(s) left)")


@env_app.command("list")
def env_list(vm_id: VmId, json_out: JsonOpt = False) -> None:
    """List variables (read from the guest when running, else from the stored config)."""
    with open_vm(vm_id) as vm:
        env = vm.list_env_vars() if str(vm.refresh().status) == "running" else _stored_env(vm)
    if json_out:
        emit_json(env)
        return
    for k in sorted(env):
        out.print(f"{k}={shlex.quote(env[k])}", markup=False)
