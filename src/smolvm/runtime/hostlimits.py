"""Per-host ceilings on what one VM may ask for (a config may come from an agent).

Defaults: the host's CPU count, its physical memory, 256 GiB of disk. Raise or lower them
with ``SMOLVM_MAX_VCPUS``, ``SMOLVM_MAX_MEM_MIB`` and ``SMOLVM_MAX_DISK_MIB``.
"""

from __future__ import annotations

import os

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
