"""Snapshots: save a VM's memory + device state, freeze its disk, restore any number of
clones; image snapshots make ``SmolVM()`` a restore. Built on :mod:`smolvm.runtime`."""

from smolvm.snapshots.image import (
    build_default_snapshot,
    default_snapshot_for,
    discard_image_snapshot,
    ensure_image_snapshot,
    image_snapshot_ref,
    prune_image_snapshots,
    snapshot_boot_enabled,
)
from smolvm.snapshots.records import (
    IMAGE_REF_PREFIX,
    SNAPSHOT_FORMAT,
    SnapshotInfo,
    delete_snapshot,
    gc_incomplete,
    get_snapshot,
    list_snapshots,
)
from smolvm.snapshots.restore import create_clone, restore_vm
from smolvm.snapshots.save import create_snapshot

__all__ = [
    "SnapshotInfo",
    "IMAGE_REF_PREFIX",
    "SNAPSHOT_FORMAT",
    "create_snapshot",
    "get_snapshot",
    "list_snapshots",
    "delete_snapshot",
    "gc_incomplete",
    "create_clone",
    "restore_vm",
    "ensure_image_snapshot",
    "default_snapshot_for",
    "image_snapshot_ref",
    "discard_image_snapshot",
    "prune_image_snapshots",
    "build_default_snapshot",
    "snapshot_boot_enabled",
]
