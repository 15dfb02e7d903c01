"""Schema migrations. Append only: each entry upgrades ``PRAGMA user_version`` by one."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: VMs, the host resources they own, reserved ports, snapshots.
    """
    CREATE TABLE vms (
        vm_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        backend TEXT NOT NULL,
        config TEXT NOT NULL,
        network TEXT NOT NULL DEFAULT '{}',
        pid INTEGER,
        accelerator TEXT,
        accelerator_reason TEXT,
        vm_dir TEXT,
        disk_path TEXT,
        host_key TEXT,
        error TEXT,
        snapshot TEXT,
        pool TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX vms_status ON vms(status);
    CREATE TABLE resources (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE(kind, value)
    );
    CREATE INDEX resources_vm ON resources(vm_id);
    CREATE TABLE ports (
        port INTEGER PRIMARY KEY,
        vm_id TEXT NOT NULL,
        purpose TEXT NOT NULL
    );
    CREATE TABLE snapshots (
        name TEXT PRIMARY KEY,
        source_vm TEXT,
        path TEXT NOT NULL,
        config TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    """,
    # 2: audit log of every command (see smolvm.guards.audit).
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL,
        command TEXT NOT NULL,
        shell TEXT,
        timeout REAL,
        started_at REAL NOT NULL,
        ended_at REAL,
        duration REAL,
        exit_code INTEGER,
        stdout_bytes INTEGER,
        stderr_bytes INTEGER,
        status TEXT NOT NULL,
        blocked_by TEXT,
        error TEXT,
        channel TEXT
    );
    CREATE INDEX IF NOT EXISTS audit_vm ON audit_log(vm_id, started_at);
    """,
    # 3: warm pools — the process (pid:starttime token) that keeps a pool VM; its death
    # lets reconcile() or another pool reclaim the VM.
    """
    ALTER TABLE vms ADD COLUMN pool_owner TEXT;
    CREATE INDEX IF NOT EXISTS vms_pool ON vms(pool, status);
    """,
    # 4: audit log's time index and captured output (see smolvm.guards.audit).
    """
    CREATE INDEX IF NOT EXISTS audit_started ON audit_log(started_at);
    CREATE TABLE IF NOT EXISTS audit_output (
        audit_id INTEGER PRIMARY KEY,
        stdout TEXT,
        stderr TEXT,
        truncated INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 5: lifetimes (see smolvm.runtime.lifetime): the process (pid:starttime token) whose
    # death ends the VM, and each owner process's watchdog.
    """
    ALTER TABLE vms ADD COLUMN owner TEXT;
    CREATE INDEX IF NOT EXISTS vms_owner ON vms(owner);
    CREATE TABLE IF NOT EXISTS watchdogs (
        owner TEXT PRIMARY KEY,
        token TEXT,
        created_at REAL NOT NULL
    );
    """,
]
