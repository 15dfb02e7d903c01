"""``SmolVM(...)`` keyword arguments → one :class:`VMConfig`: the seed names, the public
API's aliases (``memory``, ``disk_size``, ``os``, ``comm_channel="vsock"``) and workspace
mounts (``mounts=["./repo:/workspace"]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smolvm.exceptions import ValidationError
from smolvm.transports.base import ExecRequest, ShellMode
from smolvm.types import Limits, VMConfig, WorkspaceMount, validate_env_key

#: Guest operating systems ``os=`` accepts: Debian is the default image (built offline from
#: Debian packages); Alpine needs Alpine's mirror.
OS_CHOICES = ("debian", "alpine")


def _one(seed: str, seed_value: Any, alias: str, alias_value: Any) -> Any:
    if seed_value is not None and alias_value is not None and seed_value != alias_value:
        raise ValidationError(
            f"{seed}={seed_value!r} and its alias {alias}={alias_value!r} disagree: pass one",
            field=seed,
        )
    return seed_value if seed_value is not None else alias_value


def parse_mounts(
    mounts: Sequence[str | WorkspaceMount] | None, *, writable: bool = False
) -> list[WorkspaceMount]:
    """``"HOST:GUEST[:ro|:rw]"`` strings (``writable`` is the default mode) or mounts."""
    if mounts is None:
        return []
    if isinstance(mounts, (str, bytes)):
        raise ValidationError("mounts must be a list, e.g. mounts=['./repo:/workspace']", field="mounts")
    out = []
    for m in mounts:
        if isinstance(m, WorkspaceMount):
            out.append(m)
        elif isinstance(m, str):
            out.append(WorkspaceMount.parse(m, writable=writable))
        else:
            raise ValidationError(f"mount {m!r}: use 'HOST:GUEST' or a WorkspaceMount", field="mounts")
    return out


def sandbox_config(config: VMConfig | None, image_dir: Path, **kw: Any) -> VMConfig:
    """The config a ``SmolVM(config, **kw)`` runs: explicit keywords override ``config``."""
    if config is not None and not isinstance(config, VMConfig):
        raise ValidationError(f"config must be a VMConfig, got {type(config).__name__}", field="config")
    overrides: dict[str, Any] = {
        "mem_size_mib": _one("mem_size_mib", kw.get("mem_size_mib"), "memory", kw.get("memory")),
        "disk_size_mib": _one("disk_size_mib", kw.get("disk_size_mib"), "disk_size", kw.get("disk_size")),
        "vcpu_count": kw.get("vcpu_count"),
        "env_vars": kw.get("env_vars"),
        "comm_channel": kw.get("comm_channel"),
        "internet_settings": kw.get("internet_settings"),
    }
    mounts = parse_mounts(kw.get("mounts"), writable=bool(kw.get("writable_mounts")))
    if mounts:
        overrides["workspace_mounts"] = mounts
    os_name = kw.get("os")
    if os_name is not None:
        if os_name not in OS_CHOICES:
            raise ValidationError(f"os must be one of {', '.join(OS_CHOICES)}, got {os_name!r}", field="os")
        if os_name == "alpine":
            from smolvm.images.builder import ImageBuilder  # ~7 ms to import; builds only

            art = ImageBuilder(image_dir).ensure_alpine()
            overrides.update(kernel_path=art.kernel, rootfs_path=art.rootfs)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        return VMConfig(**overrides)
    if not overrides:
        return config
    explicit = {k: v for k, v in config.model_dump().items() if k in config.model_fields_set}
    return VMConfig(**{**explicit, **overrides})


#: Bytes of each output stream ``run()`` keeps by default (the rest reaches the output
#: callbacks only; the result says ``truncated``). Enough for a 100 MB build log.
DEFAULT_MAX_OUTPUT_BYTES = 128 * 1024 * 1024
#: Largest guest file ``download_file`` writes by default (bytes; a hostile guest must not
#: be able to fill the host's disk through an innocent-looking download).
DEFAULT_MAX_DOWNLOAD = 1024 * 1024 * 1024


def exec_request(
    command: str,
    timeout: float | None,
    shell: str,
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    limits: Limits | None,
    max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
    capture: bool = True,
) -> ExecRequest:
    """A validated request for ``run``/``spawn`` (``timeout`` in seconds, None = none)."""
    if not isinstance(command, str) or not command.strip():
        raise ValidationError("command must be a non-empty string", field="command")
    if shell not in ("login", "raw"):
        raise ValidationError(f"shell must be 'login' or 'raw', got {shell!r}", field="shell")
    if timeout is not None and timeout <= 0:
        raise ValidationError(f"timeout must be > 0 seconds, got {timeout}", field="timeout")
    for k in env or {}:
        try:
            validate_env_key(k)
        except ValueError as exc:
            raise ValidationError(str(exc), field="env") from None
    if limits is not None and not isinstance(limits, Limits):
        raise ValidationError(f"limits must be a smolvm.Limits, got {type(limits).__name__}", field="limits")
    if max_output_bytes is not None and (
        isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) or max_output_bytes < 0
    ):
        raise ValidationError(
            f"max_output_bytes must be an integer >= 0 or None, got {max_output_bytes!r}",
            field="max_output_bytes",
        )
    mode: ShellMode = "login" if shell == "login" else "raw"
    return ExecRequest(
        command,
        mode,
        timeout,
        dict(env or {}),
        cwd,
        stdin,
        limits=limits,
        max_output_bytes=max_output_bytes,
        capture=capture,
    )


def checked_env(env_vars: dict[str, str]) -> dict[str, str]:
    """``env_vars`` with string values, or ``ValidationError`` for a bad name or a NUL."""
    try:
        for k, v in env_vars.items():
            validate_env_key(k)
            if "\x00" in str(v):
                raise ValueError(f"value of {k} contains a NUL byte")
    except ValueError as exc:
        raise ValidationError(str(exc), field="env_vars") from None
    return {k: str(v) for k, v in env_vars.items()}
