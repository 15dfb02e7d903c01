"""The runtime layer: launch specs, the resource ledger, machine create / boot / halt /
purge / reconcile, guest RAM, clone identity. Imports nothing above it (snapshots, pools,
the public API)."""

from smolvm.runtime.machines import BOOT_TIMEOUT, STOP_TIMEOUT, Runtime

__all__ = ["Runtime", "BOOT_TIMEOUT", "STOP_TIMEOUT"]
