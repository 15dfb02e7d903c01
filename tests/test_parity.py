"""Public-API parity on real guests: SSH that reconnects, unnamed snapshots and their ids,
constructor aliases, and workspace mounts (virtio-9p) that never let the guest out."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from smolvm import (
    CommandFateUnknownError,
    ImageError,
    SmolVM,
    SnapshotError,
    SnapshotInfo,
    TransportError,
    ValidationError,
    VMState,
)
from smolvm.transports.base import ExecRequest
from smolvm.types import WorkspaceMount

pytestmark = pytest.mark.e2e


# ---------------------------------------------------------------------------- SSH
def test_ssh_on_restored_sandboxes_never_drops(vms, tmp_path: Path) -> None:
    """start -> run -> upload -> run -> download, 50 times over SSH on restored sandboxes:
    not one transport error (the restore finishes its SSH identity work first)."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(64 * 1024))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    errors: list[str] = []
    for i in range(50):
        vm = vms.sandbox(comm_channel="ssh")
        try:
            vm.start()
            assert vm.info.snapshot and vm.info.snapshot.startswith("image:"), "not a restore"
            assert vm.run("exit 7").exit_code == 7
            vm.upload_file(payload, "/root/payload.bin")
            out = vm.run("sha256sum /root/payload.bin").output.split()[0]
            assert out == digest
            back = tmp_path / f"back-{i}.bin"
            vm.download_file("/root/payload.bin", back)
            assert back.read_bytes() == payload.read_bytes()
            assert vm.channel == "ssh"
        except TransportError as exc:
            errors.append(f"round {i}: {exc}")
        finally:
            vm.delete()
            vm.close()
    assert errors == []


def test_ssh_drop_after_start_is_fate_unknown_and_never_retried(vms) -> None:
    """A command that kills its own SSH connection: the host cannot know how far it got, so
    it raises CommandFateUnknownError instead of running it again; the next call reconnects."""
    with vms.sandbox(comm_channel="ssh") as vm:
        assert vm.run("true").ok
        before = vm._transport.connects
        kill_my_connection = (
            "echo x >> /root/runs; sleep 0.2; "
            "kill -9 $(cut -d' ' -f4 /proc/$PPID/stat); sleep 5"  # the dropbear serving us
        )
        with pytest.raises(CommandFateUnknownError, match="may have started"):
            vm.run(kill_my_connection, shell="raw", timeout=30)
        assert vm.run("wc -l < /root/runs", shell="raw").output == "1"  # ran once, not twice
        assert vm._transport.connects == before + 1


def test_ssh_start_log_tells_started_from_never_started(vms) -> None:
    """The check behind the one safe retry, against a real guest."""
    with vms.sandbox(comm_channel="ssh") as vm:
        assert vm.run("true").ok
        t = vm._transport
        h = t.spawn(ExecRequest("sleep 0.1", "raw", 30))
        h.wait(30)
        assert t._never_started(h._tag) is False
        assert t._never_started("smolvm-cmd-" + "0" * 32) is True


# ---------------------------------------------------------------------------- snapshots
def test_unnamed_snapshot_and_from_snapshot_resume_flag(vms) -> None:
    with vms.sandbox() as src:
        src.run("echo kept > /root/kept")
        info = src.snapshot()
        assert isinstance(info, SnapshotInfo) and info.snapshot_id == info.name
        assert info.snapshot_id.startswith("snap-")
        assert src.run("cat /root/kept").output == "kept"  # the source keeps running
    running = SmolVM.from_snapshot(info.snapshot_id, data_dir=vms.data_dir)
    vms.vm_ids.append(running.vm_id)
    with running:
        assert running.status is VMState.RUNNING
        assert running.run("cat /root/kept").output == "kept"
    paused = SmolVM.from_snapshot(info.snapshot_id, resume_vm=False, data_dir=vms.data_dir, backend="qemu")
    vms.vm_ids.append(paused.vm_id)
    with paused:
        assert paused.status is VMState.PAUSED
        paused.resume()
        assert paused.run("cat /root/kept").output == "kept"
    vms.manager.delete_snapshot(info.snapshot_id)


# ---------------------------------------------------------------------------- aliases
def test_constructor_aliases(vms) -> None:
    vm = vms.sandbox(memory=384, disk_size=2560, os="debian", comm_channel="vsock")
    assert vm.info.config.mem_size_mib == 384 and vm.info.config.disk_size_mib == 2560
    assert vm.info.config.comm_channel == "agent"
    with vm:
        kib = int(vm.run("grep MemTotal /proc/meminfo", shell="raw").output.split()[1])
        assert 300 * 1024 < kib <= 384 * 1024, kib
        assert vm.channel == "agent"
    with pytest.raises(ValidationError, match="disagree"):
        vms.sandbox(mem_size_mib=512, memory=256)
    with pytest.raises(ValidationError, match="os must be one of"):
        vms.sandbox(os="windows")


def test_os_alpine_without_its_mirror_is_a_clear_image_error(vms, monkeypatch) -> None:
    # A closed port on loopback stands in for an unreachable mirror (no outside traffic).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SMOLVM_ALPINE_MIRROR", f"http://127.0.0.1:{port}/alpine")
    with pytest.raises(ImageError, match="SMOLVM_ALPINE_MIRROR"):
        vms.sandbox(os="alpine")


# ---------------------------------------------------------------------------- mounts
@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "README.md").write_text("hello from the host\n")
    (d / "src").mkdir()
    (d / "src" / "main.py").write_text("print('hi')\n")
    return d


def test_mount_paths_are_checked(share: Path, tmp_path: Path, vms) -> None:
    with pytest.raises(ValidationError, match="not an existing directory"):
        vms.sandbox(mounts=[f"{tmp_path / 'nope'}:/workspace"])
    link = tmp_path / "link"
    link.symlink_to(share)
    with pytest.raises(ValidationError, match="symlink"):
        vms.sandbox(mounts=[f"{link}:/workspace"])
    with pytest.raises(ValidationError, match="would cover"):
        vms.sandbox(mounts=[f"{share}:/proc/x"])
    with pytest.raises(ValidationError, match="no '..'"):
        vms.sandbox(mounts=[f"{share}:/workspace/../etc"])
    with pytest.raises(ValidationError, match="overlap"):
        vms.sandbox(mounts=[f"{share}:/w", f"{share}:/w/sub"])
    with pytest.raises(ValidationError, match="list"):
        vms.sandbox(mounts=f"{share}:/workspace")
    assert WorkspaceMount.parse(f"{share}:/w:rw").writable is True


def test_read_only_mount_has_a_writable_overlay_that_stays_in_the_vm(share: Path, vms) -> None:
    before = sorted(p.name for p in share.rglob("*"))
    vm = vms.sandbox(mounts=[f"{share}:/workspace"])
    assert vm.info.snapshot is None  # a mount changes the launch: cold boot, not a restore
    with vm:
        assert vm.run("cat /workspace/README.md").output == "hello from the host"
        assert vm.run("python3 /workspace/src/main.py").output == "hi"
        r = vm.run(
            "echo guest > /workspace/new.txt && echo more >> /workspace/README.md && "
            "rm /workspace/src/main.py"
        )
        assert r.ok, r.stderr
        assert vm.run("cat /workspace/new.txt").output == "guest"
        assert vm.run("test -e /workspace/src/main.py || echo gone").output == "gone"
        # The host directory is untouched, and the share itself is read-only underneath.
        assert sorted(p.name for p in share.rglob("*")) == before
        assert (share / "README.md").read_text() == "hello from the host\n"
        assert not vm.run("touch /run/smolvm/mnt/smolvm0/x", shell="raw").ok
        # Survives stop/start: the share is mounted again, the VM's own changes are kept.
        vm.stop()
        vm.start()
        assert vm.run("cat /workspace/new.txt").output == "guest"
        assert vm.run("head -1 /workspace/README.md").output == "hello from the host"
        with pytest.raises(SnapshotError, match="workspace mounts"):
            vm.snapshot("with-mount")
    assert sorted(p.name for p in share.rglob("*")) == before


def test_writable_mount_writes_through_with_safe_host_modes(share: Path, vms) -> None:
    with vms.sandbox(mounts=[f"{share}:/workspace"], writable_mounts=True) as vm:
        r = vm.run(
            "echo from-guest > /workspace/out.txt && cp /bin/true /workspace/suid && "
            "chmod 6777 /workspace/suid && mkdir /workspace/d && chmod 1777 /workspace/d",
            shell="raw",
        )
        assert r.ok, r.stderr
        # The guest sees what it asked for (kept in xattrs) ...
        assert vm.run("stat -c %a /workspace/suid", shell="raw").output == "6777"
    assert (share / "out.txt").read_text() == "from-guest\n"
    # ... the host gets owner-only modes: no setuid/setgid/sticky, nothing world-writable.
    for p in (share / "out.txt", share / "suid", share / "d"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o7000 == 0 and mode & 0o022 == 0, (p, oct(mode))


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_guest_cannot_reach_outside_a_mount(share: Path, tmp_path: Path, vms, mode: str) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-SECRET-7f3a\n")
    (share / "escape").symlink_to(secret)  # a host symlink pointing out of the share
    (share / "up").symlink_to("../..")
    os.link(secret, tmp_path / "outside-link")  # unrelated hard link outside the share
    with vms.sandbox(mounts=[f"{share}:/workspace:{mode}"]) as vm:
        everything = vm.run(
            "cat /workspace/escape /workspace/up/host-secret.txt /workspace/../host-secret.txt "
            "2>/dev/null; ls -a /workspace/.. /workspace/up 2>/dev/null; grep -r HOST-SECRET / "
            "--include=*.txt -l 2>/dev/null | head; true",
            shell="raw",
            timeout=60,
        ).output
        assert "HOST-SECRET" not in everything
        # The guest sees at most a host symlink's text (read-only shares; writable ones do
        # not follow host symlinks at all), which it resolves in its own filesystem.
        assert vm.run("readlink /workspace/escape", shell="raw").output in ("", str(secret))
        # '..' at the share's root stays in the guest.
        assert vm.run("ls /workspace/..", shell="raw").output == vm.run("ls /", shell="raw").output
        # A hard link from the guest's own files into the share crosses devices: refused.
        r = vm.run("ln /etc/hostname /workspace/hl", shell="raw")
        assert not r.ok and "cross-device" in r.stderr.lower() + r.stdout.lower(), r
    assert secret.read_text() == "HOST-SECRET-7f3a\n"
    assert not (share / "hl").exists()


def test_cli_create_mount(share: Path, vms) -> None:
    from test_cli import cli_env, smolvm

    r = smolvm(
        vms.data_dir,
        "create",
        "--id",
        "cli-mount",
        "--mount",
        f"{share}:/workspace",
        "--start",
        env=cli_env(vms.data_dir),
    )
    vms.vm_ids.append("cli-mount")
    assert r.code == 0, str(r)
    r = smolvm(
        vms.data_dir, "run", "cli-mount", "--", "cat", "/workspace/README.md", env=cli_env(vms.data_dir)
    )
    assert r.code == 0 and r.out.strip() == "hello from the host", str(r)
    info = smolvm(vms.data_dir, "info", "cli-mount", "--json", env=cli_env(vms.data_dir)).json()
    assert info["config"]["workspace_mounts"] == [
        {"host_path": str(share), "guest_path": "/workspace", "writable": False}
    ]
