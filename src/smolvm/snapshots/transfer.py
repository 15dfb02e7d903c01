"""Moving a user snapshot to another data dir or machine (fleet-wide snapshots).

:func:`pack_snapshot` reads a snapshot's files as data extents (holes of the sparse memory
file are skipped, so a 512 MiB guest that used 60 MiB moves ~60 MiB) together with its
parents (a snapshot of a restored VM is a qcow2 layer on its parent's disk).
:func:`unpack_snapshot` writes them under another data dir, parents first, rebases each
disk on its parent's new path and records the snapshot there. The image the snapshot was
made from (kernel, rootfs) must exist at the same path on the target: build the same image
on every machine (``smolvm image build`` / ``ImageBuilder().ensure_default()``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvm.exceptions import SnapshotError, SnapshotNotFoundError
from smolvm.runtime import Runtime
from smolvm.runtime.overlay import backing_file
from smolvm.snapshots.records import IMAGE_REF_PREFIX, SnapshotInfo, get_snapshot, snapshots_dir

#: The files of a snapshot directory (see :mod:`smolvm.snapshots.records`).
FILES = ("meta.json", "state", "mem", "disk.qcow2")
_EXTENT = 8 * 1024 * 1024  # bytes read per extent piece


@dataclass
class SnapshotPack:
    """A snapshot's files as bytes, ready to move (picklable)."""

    name: str
    #: file name -> (size in bytes, [(offset, data)]) ; holes are left out.
    files: dict[str, tuple[int, list[tuple[int, bytes]]]]
    parent: SnapshotPack | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        own = sum(len(d) for _size, ext in self.files.values() for _off, d in ext)
        return own + (self.parent.nbytes if self.parent else 0)


def _extents(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
    out: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for off in range(start, end, _EXTENT):
                out.append((off, os.pread(fd, min(_EXTENT, end - off), off)))
            pos = end
    return size, out


def write_pack(pack: SnapshotPack, root: Path) -> Path:
    """Store ``pack`` (and its parents) as plain sparse files under ``root/<name>/`` — a
    directory every machine mounts — for :func:`read_pack`."""
    if pack.parent is not None:
        write_pack(pack.parent, root)
    final = Path(root) / pack.name
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".out-{pack.name}-", dir=final.parent))
    try:
        _write_files(pack, tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_pack(root: Path, name: str) -> SnapshotPack:
    """The pack :func:`write_pack` stored under ``root``."""
    d = Path(root) / name
    if not (d / "meta.json").is_file():
        raise SnapshotNotFoundError(f"no fleet snapshot {name!r} under {root}")
    meta = json.loads((d / "meta.json").read_text())
    files = {f: _extents(d / f) for f in FILES if (d / f).is_file()}
    parent = read_pack(root, meta["parent"]) if meta.get("parent") else None
    return SnapshotPack(name, files, parent, meta)


def _write_files(pack: SnapshotPack, d: Path) -> None:
    for fname, (size, extents) in pack.files.items():
        if fname not in FILES:
            raise SnapshotError(f"unexpected file {fname!r} in snapshot pack {pack.name!r}")
        fd = os.open(d / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            for off, data in extents:
                os.pwrite(fd, data, off)
        finally:
            os.close(fd)


def pack_snapshot(rt: Runtime, name: str) -> SnapshotPack:
    """The snapshot ``name`` of this data dir (and its parents) as a :class:`SnapshotPack`."""
    snap = get_snapshot(rt, name)
    if snap.kind != "user":
        raise SnapshotError(f"{name!r} is an image snapshot: every machine builds its own")
    meta = json.loads((snap.path / "meta.json").read_text())
    files = {f: _extents(snap.path / f) for f in FILES if (snap.path / f).exists()}
    parent = None
    if snap.parent and snap.parent.startswith(IMAGE_REF_PREFIX):
        # An image snapshot is booted anew on every machine (its disk differs): the disk
        # travels as one layer on the image's rootfs instead (which image_key checks).
        with tempfile.TemporaryDirectory(prefix="smolvm-pack-") as d:
            flat = Path(d) / "disk.qcow2"
            shutil.copyfile(snap.path / "disk.qcow2", flat)
            base = get_snapshot(rt, snap.parent).path / "disk.qcow2"
            rootfs = backing_file(base)
            if rootfs is None:
                raise SnapshotError(f"image snapshot {snap.parent!r} has no backing image")
            _rebase(flat, Path(rootfs), safe=True)
            files["disk.qcow2"] = _extents(flat)
        meta.update(parent=None, backing=rootfs)
    elif snap.parent:
        parent = pack_snapshot(rt, snap.parent)
    return SnapshotPack(name, files, parent, meta)


def unpack_snapshot(rt: Runtime, pack: SnapshotPack) -> SnapshotInfo:
    """Record ``pack`` in this data dir (parents first). A snapshot of that name already
    here is kept when it is the same one (same creation record), else ``SnapshotError``."""
    if pack.parent is not None:
        unpack_snapshot(rt, pack.parent)
    existing = rt.state.get_snapshot(pack.name)
    if existing is not None:
        if _origin(existing.meta) == _origin(pack.meta):
            return get_snapshot(rt, pack.name)
        raise SnapshotError(f"a different snapshot named {pack.name!r} exists here: delete it or rename")
    final = snapshots_dir(rt) / pack.name
    tmp = Path(tempfile.mkdtemp(prefix=f".in-{pack.name}-", dir=final.parent))
    try:
        _write_files(pack, tmp)
        meta = {k: v for k, v in pack.meta.items() if k not in ("config", "name")}
        meta["packed_from"] = _origin(pack.meta)
        if pack.parent is not None:
            parent_disk = get_snapshot(rt, pack.parent.name).path / "disk.qcow2"
            _rebase(tmp / "disk.qcow2", parent_disk)
            meta["backing"] = str(parent_disk)
        (tmp / "meta.json").write_text(json.dumps({**meta, "config": pack.meta["config"], "name": pack.name}))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        rt.state.insert_snapshot(
            pack.name, source_vm=None, path=str(final), config=pack.meta["config"], meta=meta
        )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return get_snapshot(rt, pack.name)


def _origin(meta: dict[str, Any]) -> str:
    """Identifies one snapshot across machines: where and when its state was saved."""
    return str(meta.get("packed_from") or f"{meta.get('source_vm')}@{meta.get('created_at')}")


def _format(path: Path) -> str:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise SnapshotError(f"cannot read {path}: {proc.stderr.strip()[:300]}")
    return str(json.loads(proc.stdout)["format"])


def _rebase(disk: Path, backing: Path, *, safe: bool = False) -> None:
    # Unsafe (-u): only the header's backing path changes (same content, new place). Safe:
    # what the old chain held above ``backing`` is copied into ``disk``.
    mode = [] if safe else ["-u"]
    proc = subprocess.run(
        ["qemu-img", "rebase", *mode, "-f", "qcow2", "-F", _format(backing), "-b", str(backing), str(disk)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SnapshotError(f"cannot rebase {disk} on {backing}: {proc.stderr.strip()[:300]}")
