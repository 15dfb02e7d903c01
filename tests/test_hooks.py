"""Hooks on every guest-facing operation: file transfers, env changes and lifecycle
actions can be vetoed before and are observed after (AuditLog records them all)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolvm import Callback, CommandBlockedError
from smolvm.callbacks import EnvContext, FileContext, LifecycleContext
from smolvm.guards import AuditLog, SafetyGuard

pytestmark = pytest.mark.e2e


class NoStop(Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_pre_lifecycle(self, ctx: LifecycleContext) -> None:
        if ctx.action == "stop":
            raise CommandBlockedError("stopping is not allowed here", vm_id=ctx.vm_id)

    def on_post_lifecycle(self, ctx: LifecycleContext) -> None:
        self.seen.append(f"{ctx.action}:{'error' if ctx.error else 'ok'}")

    def on_post_file(self, ctx: FileContext) -> None:
        self.seen.append(f"{ctx.direction}:{ctx.guest_path}:{ctx.size}")

    def on_post_env(self, ctx: EnvContext) -> None:
        self.seen.append(f"env:{sorted(ctx.set)}:{ctx.unset}")


def test_every_operation_is_vetoable_and_audited(vms, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    watcher = NoStop()
    vm = vms.sandbox(callbacks=[SafetyGuard(), audit, watcher]).start()
    payload = tmp_path / "p.sh"
    payload.write_text("echo pwned\n")
    # An upload that would run later, unseen: vetoed, and recorded as blocked.
    with pytest.raises(CommandBlockedError, match="startup-file"):
        vm.upload_file(payload, "/etc/profile.d/zz-evil.sh")
    with pytest.raises(CommandBlockedError):
        vm.files.write("/root/../etc/cron.d/job", "* * * * * root id\n")
    assert not vm.files.exists("/etc/profile.d/zz-evil.sh")
    vm.upload_file(payload, "/root/p.sh")  # elsewhere: fine
    vm.download_file("/root/p.sh", tmp_path / "back.sh")
    vm.set_env_vars({"TOKEN": "s3cret"})
    vm.unset_env_vars(["TOKEN"])
    with pytest.raises(CommandBlockedError, match="not allowed"):
        vm.stop()
    assert vm.refresh().status.value == "running"  # the veto held
    vm.pause()
    vm.resume()
    assert vm.run("echo alive").output == "alive"
    rows = {(r.command.split(" ")[0], r.status) for r in audit.query(vm_id=vm.vm_id, limit=100)}
    assert ("[upload]", "blocked") in rows and ("[upload]", "ok") in rows and ("[download]", "ok") in rows
    assert ("[env]", "ok") in rows and ("[stop]", "blocked") in rows
    assert ("[pause]", "ok") in rows and ("[resume]", "ok") in rows
    assert not any("s3cret" in r.command for r in audit.query(vm_id=vm.vm_id, limit=100))  # names only
    assert "upload:/root/p.sh:11" in watcher.seen and "download:/root/p.sh:11" in watcher.seen
    assert "env:['TOKEN']:[]" in watcher.seen and "env:[]:['TOKEN']" in watcher.seen
    assert "stop:error" in watcher.seen and "pause:ok" in watcher.seen
    audit.close()
