"""Shared CLI plumbing: global options, consoles, error reporting, parsing and output helpers.

Conventions (every command follows them):

* data goes to stdout (tables, ids, ``--json``), diagnostics and progress to stderr;
* colour only on a terminal — rich decides, and honours ``NO_COLOR``;
* exit codes: 0 ok, 1 error, 2 usage error; ``run`` passes the guest's exit code through;
* errors are one line ``error: <message>`` (plus ``fix: <remediation>`` when known), with
  the traceback only under ``--debug`` / ``SMOLVM_DEBUG=1``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from smolvm.envflags import env_flag

if TYPE_CHECKING:
    from smolvm.smolvm import SmolVM
    from smolvm.vm import SmolVMManager

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # like timeout(1): `smolvm run` hit --timeout
EXIT_INTERRUPTED = 130
EXIT_SIGPIPE = 141  # 128 + SIGPIPE: `smolvm run … | head` closed our stdout


#: Console for data (stdout) and for diagnostics (stderr). No syntax highlighting: numbers
#: and paths in our messages are not code.
def _console(stream: Any, **kw: Any) -> Console:
    # Piped output is for grep/awk: do not wrap or truncate table cells at 80 columns.
    wide = not os.environ.get("COLUMNS") and not _isatty(stream)
    return Console(highlight=False, soft_wrap=True, width=240 if wide else None, **kw)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


out = _console(sys.stdout)
err = _console(sys.stderr, stderr=True)


@dataclass
class Options:
    """Global options, set once by the root callback."""

    data_dir: Path | None = None
    backend: str | None = None
    debug: bool = False


OPTS = Options(debug=env_flag("SMOLVM_DEBUG", False))


class CLIError(Exception):
    """An error found by the CLI itself (not the SDK), with an optional fix and exit code."""

    def __init__(self, message: str, remediation: str | None = None, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.remediation = remediation
        self.code = code


def usage_error(message: str, remediation: str | None = None) -> CLIError:
    return CLIError(message, remediation, EXIT_USAGE)


class _CLIHandler(logging.StreamHandler):
    """The CLI's own stderr handler (replaced, not stacked, when logging is reconfigured)."""


def configure_logging(debug: bool) -> None:
    """SDK log records go to stderr: warnings normally, everything under ``--debug``."""
    logger = logging.getLogger("smolvm")
    for h in list(logger.handlers):
        if isinstance(h, _CLIHandler):
            logger.removeHandler(h)
    handler = _CLIHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s" if debug else "%(levelname)s: %(message)s"
        )
    )
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False


# ---------------------------------------------------------------------- error reporting
def exit_code_for(exc: BaseException) -> int:
    from smolvm.exceptions import ValidationError

    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, ValidationError):
        return EXIT_USAGE
    return EXIT_ERROR


def remediation_of(exc: BaseException) -> str | None:
    rem = getattr(exc, "remediation", None)
    if not rem:
        details = getattr(exc, "details", None)
        if isinstance(details, dict):
            rem = details.get("remediation")
    return str(rem) if rem else None


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as ``error: …`` (+ ``fix: …``) on stderr; returns the exit code."""
    from smolvm.exceptions import SmolVMError

    if OPTS.debug:
        err.print(traceback.format_exc().rstrip(), markup=False, style="dim")
    known = isinstance(exc, (SmolVMError, CLIError))
    text = str(exc).strip() or type(exc).__name__
    if not known:
        text = f"{type(exc).__name__}: {text}"
    first, _, rest = text.partition("\n")
    err.print(f"[bold red]error:[/] {esc(first)}")
    if rest.strip():
        if OPTS.debug or not known:
            err.print(esc(rest.rstrip()), style="dim")
        else:
            err.print("[dim](more detail with --debug)[/]")
    rem = remediation_of(exc)
    if rem:
        label = "hint" if exit_code_for(exc) == EXIT_USAGE else "fix"
        err.print(f"[yellow]{label}:[/] {esc(rem)}")
    if not known and not OPTS.debug:
        err.print(
            "[dim]this looks like a bug in smolvm: rerun with --debug (or SMOLVM_DEBUG=1) "
            "for the traceback[/]"
        )
    return exit_code_for(exc)


def esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def info(msg: str) -> None:
    """A progress/status line on stderr (rich markup allowed)."""
    err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}")


# ---------------------------------------------------------------------- output
def emit_json(obj: Any) -> None:
    """Machine-readable output: JSON on stdout, one document, newline-terminated."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def vm_to_dict(info: Any) -> dict[str, Any]:
    return info.model_dump(mode="json")


def fmt_age(ts: Any) -> str:
    """ "3m ago" for a datetime/epoch (None → "-")."""
    if ts is None:
        return "-"
    try:
        epoch = ts.timestamp() if hasattr(ts, "timestamp") else float(ts)
    except (TypeError, ValueError):
        return str(ts)
    d = max(0.0, time.time() - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{int(d // size)}{unit} ago"
    return f"{int(d)}s ago"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def status_style(status: str) -> str:
    return {"running": "green", "paused": "yellow", "error": "red", "stopped": "dim"}.get(status, "")


# ---------------------------------------------------------------------- parsing
def parse_env_pairs(pairs: list[str] | None, what: str = "--env") -> dict[str, str]:
    """``["K=V", ...]`` → dict; a bad item is a usage error (exit 2)."""
    from smolvm.types import validate_env_key

    env: dict[str, str] = {}
    for item in pairs or []:
        if "=" not in item:
            raise usage_error(f"{what} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            validate_env_key(k)
        except ValueError as exc:
            raise usage_error(str(exc)) from None
        env[k] = v
    return env


def command_line(args: list[str]) -> str:
    """The guest command line from CLI words.

    One word is taken as a shell command line as-is (``smolvm run ID -- 'ls | wc -l'``);
    several words are quoted and joined (``smolvm run ID -- sh -c 'echo a; echo b'``)."""
    import shlex

    if not args:
        raise usage_error("no command given", "put the command after `--`: smolvm run ID -- uname -a")
    return args[0] if len(args) == 1 else shlex.join(args)


# ---------------------------------------------------------------------- SDK access
def manager() -> SmolVMManager:
    from smolvm.vm import SmolVMManager

    return SmolVMManager(data_dir=OPTS.data_dir, backend=OPTS.backend)


@contextmanager
def open_manager() -> Iterator[SmolVMManager]:
    m = manager()
    try:
        yield m
    finally:
        m.close()


@contextmanager
def open_vm(vm_id: str, *, running: bool = False) -> Iterator[SmolVM]:
    """Attach to an existing VM; on exit release handles only (the VM keeps its state)."""
    from smolvm.smolvm import SmolVM

    vm = SmolVM.from_id(vm_id, data_dir=OPTS.data_dir, backend=OPTS.backend)
    try:
        if running:
            require_running(vm.refresh())
        yield vm
    finally:
        vm.close()


def require_running(info: Any) -> None:
    status = str(info.status)
    if status == "running":
        return
    if status == "paused":
        raise CLIError(f"VM {info.vm_id} is paused", f"resume it: smolvm resume {info.vm_id}")
    if status == "error":
        raise CLIError(
            f"VM {info.vm_id} is in state error ({info.error or 'unknown cause'})",
            f"see `smolvm logs {info.vm_id}`, then `smolvm delete {info.vm_id}`",
        )
    raise CLIError(f"VM {info.vm_id} is {status}, not running", f"start it: smolvm start {info.vm_id}")


def image_dir() -> Path:
    from smolvm.paths import resolve_data_dir, resolve_image_dir

    if os.environ.get("SMOLVM_IMAGE_DIR"):  # shared image cache: no data dir needed
        return resolve_image_dir(Path(os.environ["SMOLVM_IMAGE_DIR"]))
    return resolve_image_dir(resolve_data_dir(OPTS.data_dir))


def data_dir() -> Path:
    from smolvm.paths import resolve_data_dir

    return resolve_data_dir(OPTS.data_dir)


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]")


def neutralize(data: bytes) -> bytes:
    """Guest output made harmless for a terminal: control characters (ESC starts sequences
    that can set the title, write the clipboard or rewrite the screen) shown as ``^[``-style
    text; newlines, tabs and carriage returns kept."""

    def show(m: re.Match[bytes]) -> bytes:
        b = m[0]
        if len(b) == 2:  # a UTF-8 encoded C1 control (e.g. CSI)
            return b"\\x%02x" % b[1]
        return b"^?" if b == b"\x7f" else b"^" + bytes([b[0] ^ 0x40])

    return _CONTROL.sub(show, data)
