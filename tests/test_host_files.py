"""Host-side files of a VM are private: another local user cannot reach its sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smolvm import procs
from smolvm.exceptions import ValidationError
from smolvm.paths import default_socket_dir, private_dir

CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"


def test_private_dir_refuses_a_directory_others_can_enter(tmp_path: Path) -> None:
    d = tmp_path / "socks"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    with pytest.raises(ValidationError, match="mode 0700"):
        private_dir(d)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(ValidationError, match="must be a directory"):
        private_dir(link)
    fresh = private_dir(tmp_path / "fresh")
    assert fresh.stat().st_mode & 0o777 == 0o700


@pytest.mark.e2e
@pytest.mark.requires("root")
def test_another_local_user_cannot_connect_to_a_vms_sockets(shared_vm) -> None:
    base = shared_vm.manager.socket_dir
    assert base == default_socket_dir(shared_vm.manager.data_dir)
    for d in (base, base.parent):  # /tmp/smolvm-<uid>/<data dir hash>
        assert d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == os.geteuid()
    socks = sorted(base.glob(f"smolvm-{shared_vm.vm_id}.*.sock"))
    assert {p.name.split(".")[1] for p in socks} >= {"ctl", "agent", "net"}, socks
    for sock in socks:
        # The owner can (control) ...
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
        # ... uid 65534 ("nobody", a second local user) cannot.
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                CONNECT,
                str(sock),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0 and "PermissionError" in r.stderr, (sock, r)


@pytest.mark.e2e
def test_qemu_runs_under_its_seccomp_filter(shared_vm) -> None:
    pid = shared_vm.manager.state.get_vm(shared_vm.vm_id).pid
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Seccomp:\t2" in status  # filter mode
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in argv and b"-daemonize" not in argv
    # Snapshots still work (fd: migration, nothing spawned): save and restore a clone.
    from smolvm import SmolVM

    snap = shared_vm.snapshot()
    with SmolVM.from_snapshot(snap.snapshot_id, manager=shared_vm.manager) as clone:
        assert clone.run("echo restored").output == "restored"
    shared_vm.manager.delete_snapshot(snap.snapshot_id)


def _identity(pid: int) -> tuple[int, str, str]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["Uid"].split()[0]), status["CapEff"].strip(), status["Seccomp"].strip()


@pytest.mark.e2e
@pytest.mark.root
def test_qemu_drops_to_an_unprivileged_user(vms, tmp_path: Path) -> None:
    """As root, QEMU opens its files and then runs as the smolvm-vmm user with no
    capabilities (seccomp on), in TAP and user mode, cold-booted and restored, and snapshots
    still work (the writable disk is not reopened by path after a migration)."""
    import pwd

    from smolvm import SmolVM
    from smolvm.backends.qemu import VMM_USER_DEFAULT
    from smolvm.types import VMConfig

    assert os.geteuid() == 0, "runs as root in CI"
    uid = pwd.getpwnam(VMM_USER_DEFAULT).pw_uid  # created by scripts/setup.sh
    tap = vms.sandbox(VMConfig(network="tap"), cold_boot=True).start()
    assert _identity(tap.refresh().pid) == (uid, "0000000000000000", "2")
    assert tap.run("echo via-tap").output == "via-tap"
    tap.delete()
    cold = vms.sandbox(cold_boot=True).start()
    assert _identity(cold.refresh().pid) == (uid, "0000000000000000", "2")
    cold.run("echo kept > /root/k.txt")
    snap = cold.snapshot()
    clone = SmolVM.from_snapshot(snap.snapshot_id, manager=vms.manager).start()
    vms.track(clone.vm_id)
    assert _identity(clone.refresh().pid) == (uid, "0000000000000000", "2")
    assert clone.run("cat /root/k.txt").output == "kept"
    clone.delete()
    restored = vms.sandbox().start()  # user mode, from the image's boot snapshot
    assert _identity(restored.refresh().pid)[0] == uid
    # A VM with a 9p share keeps QEMU's own uid: QEMU reads and writes that host directory.
    share = tmp_path / "share"
    share.mkdir()
    mounted = vms.sandbox(mounts=[f"{share}:/workspace"], cold_boot=True).start()
    assert _identity(mounted.refresh().pid)[0] == 0
    cold.delete()
    vms.manager.delete_snapshot(snap.snapshot_id)


@pytest.mark.e2e
def test_guest_ram_and_qemu_files_are_owner_only(vms) -> None:
    vm = vms.sandbox(cold_boot=True).start()
    rec = vms.manager.state.get_vm(vm.vm_id)
    fd_dir = Path(f"/proc/{rec.pid}/fd")
    ram = [fd_dir / e for e in os.listdir(fd_dir) if "/dev/shm/smolvm-" in os.readlink(fd_dir / e)]
    assert ram, "cold boot keeps guest RAM in a /dev/shm file"
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in ram)
    # QEMU runs with umask 077: its pidfile (and anything else it creates) is 0600.
    assert (vms.manager.vm_dir(vm.vm_id) / "qemu.pid").stat().st_mode & 0o777 == 0o600


def test_rootless_without_tun_access_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolvm.exceptions import NetworkError
    from smolvm.network import sandbox
    from smolvm.types import InternetSettings

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox.os, "access", lambda path, mode: path != "/dev/net/tun")
    sb = sandbox.NetSandbox(dir=tmp_path, api_socket=tmp_path / "api.sock", settings=InternetSettings())
    with open(tmp_path / "log", "wb") as log, pytest.raises(NetworkError, match="chmod 0666 /dev/net/tun"):
        sandbox.launch(["/bin/false"], sb, stderr=log)
    assert not (tmp_path / "netns.go").exists() and not (tmp_path / "resolv.conf").exists()


@pytest.mark.e2e
def test_a_console_flood_stays_under_its_cap(vms, monkeypatch: pytest.MonkeyPatch) -> None:
    from smolvm.runtime import console

    monkeypatch.setenv("SMOLVM_CONSOLE_FILE_BYTES", "65536")  # cap 4 x 64 KiB
    vm = vms.sandbox(cold_boot=True).start()
    vm_dir = vms.manager.vm_dir(vm.vm_id)
    flood = "head -c 3000000 /dev/zero | tr '\\0' x > /dev/console; echo; echo FLOOD-END > /dev/console"
    assert vm.run(flood, timeout=120).exit_code == 0
    on_disk = sum(p.stat().st_size for p in console.files(vm_dir))
    assert 0 < on_disk <= console.cap_bytes() == 4 * 65536, on_disk
    assert b"FLOOD-END" in console.last_lines(vm_dir, 3)
    assert vm.run("echo still-here").output == "still-here"  # the guest never blocks on it
    writer = [r["value"] for r in vms.manager.state.resources(vm.vm_id, "helper")]
    assert any(procs.command_name(int(t.split(":")[0])) == "multilog" for t in writer)
    vm.delete()
    assert not any(procs.is_alive(int(t.split(":")[0]), t) for t in writer)  # gone with the VM
