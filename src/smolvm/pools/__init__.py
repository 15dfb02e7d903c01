"""Warm pools: paused, already-restored sandboxes handed out in milliseconds. Built on
:mod:`smolvm.snapshots` and :mod:`smolvm.runtime`."""

from smolvm.pools.warm import WarmPool, default_pool, pool_size_from_env, reap_orphans

__all__ = ["WarmPool", "default_pool", "pool_size_from_env", "reap_orphans"]
