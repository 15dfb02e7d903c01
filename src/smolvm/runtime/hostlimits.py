"""Per-host ceilings on what one VM may ask for (a config may come from an agent).

Defaults: the host's CPU count, its physical memory, 256 GiB of disk. Raise or lower them
with ``SMOLVM_MAX_VCPUS``, ``SMOLVM_MAX_MEM_MIB`` and ``SMOLVM_MAX_DISK_MIB``.

Boot files (kernel, initrd, rootfs) come from the image dir, the data dir or a directory
the host's operator trusts (``SMOLVM_TRUSTED_PATHS``, ``:``-separated): a config naming
``/etc/shadow`` as its rootfs would otherwise hand that file to the guest as a disk. They
must be regular files no other user can write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from smolvm.envflags import env_int
from smolvm.exceptions import ValidationError
from smolvm.types import VMConfig

DEFAULT_MAX_DISK_MIB = 256 * 1024


def host_mem_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 64 * 1024


def check(config: VMConfig) -> None:
    """``ValidationError`` naming the field, the ceiling and how to change it."""
    limits = (
        ("vcpu_count", config.vcpu_count, "SMOLVM_MAX_VCPUS", os.cpu_count() or 1, "vCPUs"),
        ("mem_size_mib", config.mem_size_mib, "SMOLVM_MAX_MEM_MIB", host_mem_mib(), "MiB of memory"),
        (
            "disk_size_mib",
            config.disk_size_mib or 0,
            "SMOLVM_MAX_DISK_MIB",
            DEFAULT_MAX_DISK_MIB,
            "MiB of disk",
        ),
    )
    for fld, want, env, default, unit in limits:
        ceiling = env_int(env, default, minimum=1)
        if want > ceiling:
            raise ValidationError(
                f"{fld}={want} is over this host's limit of {ceiling} {unit}; ask for less or set "
                f"{env} (the limit keeps one VM from taking the host)",
                field=fld,
            )


def trusted_roots(*dirs: Path) -> list[Path]:
    """``dirs`` plus the directories in ``SMOLVM_TRUSTED_PATHS``, resolved."""
    extra = [Path(p).expanduser() for p in os.environ.get("SMOLVM_TRUSTED_PATHS", "").split(os.pathsep) if p]
    return [p.resolve() for p in (*dirs, *extra)]


def check_paths(config: VMConfig, roots: list[Path]) -> None:
    """``ValidationError`` unless every boot file of ``config`` is a regular file under one
    of ``roots`` (symlinks resolved), owned by this user or root, not writable by others."""
    for fld in ("kernel_path", "initrd_path", "rootfs_path"):
        raw = getattr(config, fld)
        if raw is None:
            continue
        p = Path(raw).resolve()
        if not any(p.is_relative_to(r) for r in roots):
            raise ValidationError(
                f"{fld}={raw} is outside the image dir and the trusted paths "
                f"({', '.join(map(str, roots))}); move it there or add its directory to "
                "SMOLVM_TRUSTED_PATHS (a config must not hand any host file to a guest)",
                field=fld,
            )
        try:
            st = p.stat()
        except OSError as exc:
            raise ValidationError(f"{fld}={raw}: {exc.strerror}", field=fld) from None
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"{fld}={raw} is not a regular file", field=fld)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise ValidationError(
                f"{fld}={raw} can be changed by another user (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it, owned by you or root",
                field=fld,
            )
