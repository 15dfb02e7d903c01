"""Typed records read from the state store: one place decodes a stored row and its config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smolvm.types import InternetSettings, NetworkInfo, VMConfig, VMInfo, VMState, WorkspaceMount


def decode_config(data: dict[str, Any]) -> VMConfig:
    """A stored config, not re-validated (its image files may since have been removed)."""
    fields: dict[str, Any] = {k: (Path(v) if k.endswith("_path") and v else v) for k, v in data.items()}
    fields["port_forwards"] = {int(h): int(g) for h, g in (data.get("port_forwards") or {}).items()}
    fields["workspace_mounts"] = [
        WorkspaceMount.model_construct(None, **{**m, "host_path": Path(m["host_path"])})
        for m in data.get("workspace_mounts") or []
    ]
    fields["internet_settings"] = InternetSettings(**(data.get("internet_settings") or {}))
    return VMConfig.model_construct(None, **fields)


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def encode_config(config: VMConfig) -> dict[str, Any]:
    """The JSON form of ``config`` as stored."""
    return config.model_dump(mode="json")


@dataclass(frozen=True)
class VMRecord:
    """One row of the ``vms`` table."""

    vm_id: str
    status: VMState
    backend: str
    config: VMConfig
    network: NetworkInfo
    pid: int | None
    accelerator: str | None
    accelerator_reason: str | None
    vm_dir: str | None
    disk_path: str | None
    host_key: str | None
    error: str | None
    snapshot: str | None
    pool: str | None
    pool_owner: str | None
    created_at: float
    started_at: float | None
    updated_at: float
    #: The process (pid:starttime) whose death ends this VM; None when detached.
    owner: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> VMRecord:
        return cls(
            vm_id=row["vm_id"],
            status=VMState(row["status"]),
            backend=row["backend"],
            config=decode_config(row["config"]),
            network=NetworkInfo.model_validate(row.get("network") or {}),
            pid=row.get("pid"),
            accelerator=row.get("accelerator"),
            accelerator_reason=row.get("accelerator_reason"),
            vm_dir=row.get("vm_dir"),
            disk_path=row.get("disk_path"),
            host_key=row.get("host_key"),
            error=row.get("error"),
            snapshot=row.get("snapshot"),
            pool=row.get("pool"),
            pool_owner=row.get("pool_owner"),
            created_at=row["created_at"],
            started_at=row.get("started_at"),
            updated_at=row.get("updated_at") or row["created_at"],
            owner=row.get("owner"),
        )

    def replace(self, **changes: Any) -> VMRecord:
        return dataclasses.replace(self, **changes)

    def info(self) -> VMInfo:
        """The public view of this record."""
        return VMInfo(
            vm_id=self.vm_id,
            status=self.status,
            config=self.config,
            network=self.network,
            backend=self.backend,
            pid=self.pid,
            accelerator=self.accelerator,
            accelerator_reason=self.accelerator_reason,
            created_at=_utc(self.created_at),
            started_at=_utc(self.started_at),
            vm_dir=_path(self.vm_dir),
            disk_path=_path(self.disk_path),
            error=self.error,
            snapshot=self.snapshot,
            pool=self.pool,
        )


@dataclass(frozen=True)
class SnapshotRecord:
    """One row of the ``snapshots`` table; ``meta`` is the snapshot's launch facts."""

    name: str
    source_vm: str | None
    path: Path
    config: VMConfig
    meta: dict[str, Any]
    created_at: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SnapshotRecord:
        return cls(
            name=row["name"],
            source_vm=row["source_vm"],
            path=Path(row["path"]),
            config=decode_config(row["config"]),
            meta=dict(row["meta"] or {}),
            created_at=row["created_at"],
        )

    @property
    def complete(self) -> bool:
        """False while the snapshot is written (or after a crash left it half-written)."""
        return bool(self.meta.get("complete"))
