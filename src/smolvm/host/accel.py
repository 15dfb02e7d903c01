"""Accelerator choice for QEMU: KVM only when the speed probe shows real hardware."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from smolvm.paths import resolve_data_dir

if TYPE_CHECKING:
    from smolvm.host.kvm import KVMProbe

log = logging.getLogger("smolvm.host")


def accel_decision(cache_dir: Path | None = None, *, refresh: bool = False) -> KVMProbe:
    """The cached per-boot probe verdict; ``.accel`` is "kvm" or "tcg", ``.reason`` says why."""
    cache = cache_dir if cache_dir is not None else resolve_data_dir() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # The prober (ctypes, ioctl structures: ~3 ms) stays out of `import smolvm`.
    from smolvm.host.kvm import probe_kvm_cached

    probe = probe_kvm_cached(cache, refresh=refresh)
    log.info("accelerator: %s (%s)", probe.accel, probe.reason)
    return probe
