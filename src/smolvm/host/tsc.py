"""The host's TSC rate, passed to microvm guests as ``tsc_early_khz``.

Without it the guest calibrates the TSC against the PIT, which fails in ~3 of 4 boots
under TCG; a wrong value makes the guest clock run fast (platform notes).
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """TSC frequency in kHz: sysfs, else the kernel log, else /proc/cpuinfo."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    for pat in (r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz", r"tsc: Detected ([\d.]+) MHz"):
        m = re.findall(pat, log)
        if m:
            return round(float(m[-1]) * 1000)
    try:
        cpu = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        if cpu:
            return round(float(cpu.group(1)) * 1000)
    except OSError:
        pass
    return None
