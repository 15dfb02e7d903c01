"""VMConfig validation: bad values raise smolvm's ValidationError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smolvm import ValidationError, VMConfig
from smolvm.runtime.spec import merge_boot_args
from smolvm.types import VM_ID_RE, CommandResult


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vm_id": "bad id"}, "vm_id"),
        ({"vm_id": "-leading"}, "vm_id"),
        ({"vm_id": "x" * 64}, "vm_id"),
        ({"vcpu_count": 0}, "vcpu_count"),
        ({"mem_size_mib": 16}, "mem_size_mib"),
        ({"disk_size_mib": 1}, "disk_size_mib"),
        ({"kernel_path": "/nonexistent/vmlinux"}, "kernel_path"),
        ({"rootfs_path": "/nonexistent/rootfs.ext4"}, "rootfs_path"),
        ({"boot_args": "a\nb"}, "boot_args"),
        ({"env_vars": {"1BAD": "x"}}, "env_vars"),
        ({"env_vars": {"A-B": "x"}}, "env_vars"),
        ({"port_forwards": {80: 8080}}, "port_forwards"),
        ({"network": "bridge"}, "network"),
        ({"comm_channel": "telnet"}, "comm_channel"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValidationError) as ei:
        VMConfig(**kwargs)
    assert ei.value.field == field
    assert field in str(ei.value)
    assert isinstance(ei.value, ValueError)  # also catchable as ValueError


def test_valid_defaults():
    c = VMConfig()
    assert VM_ID_RE.match(c.vm_id)
    assert c.mem_size_mib == 512 and c.vcpu_count == 1
    assert "init=/init" in c.boot_args
    assert c.comm_channel == "auto" and c.network == "user"


def test_existing_paths_are_resolved(tmp_path: Path):
    k = tmp_path / "k"
    k.write_bytes(b"x")
    c = VMConfig(kernel_path=str(k))
    assert c.kernel_path == k.resolve()


def test_assignment_is_validated():
    c = VMConfig()
    with pytest.raises(ValidationError):
        c.mem_size_mib = 1


def _valid_vm_id(vm_id: str) -> bool:
    """The documented rule, written out independently of the validator's regex: 1-63
    characters of ASCII letters, digits, '-' or '_', starting with a letter or digit."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    return 1 <= len(vm_id) <= 63 and all(ch in allowed for ch in vm_id) and vm_id[0] not in "-_"


@given(st.one_of(st.text(min_size=0, max_size=70), st.text(alphabet="aZ09-_\n./ é", min_size=0, max_size=70)))
def test_vm_id_accepted_iff_documented_rule(vm_id: str):
    try:
        VMConfig(vm_id=vm_id)
        accepted = True
    except ValidationError as e:
        assert e.field == "vm_id"
        accepted = False
    assert accepted == _valid_vm_id(vm_id), repr(vm_id)


@pytest.mark.parametrize(
    "vm_id,ok",
    [
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("-a", False),
        ("_a", False),
        ("a.b", False),
        ("a/b", False),
        ("", False),
        ("abc\n", False),
        ("é", False),
        ("A-b_9", True),
    ],
)
def test_vm_id_examples(vm_id: str, ok: bool):
    assert _valid_vm_id(vm_id) is ok
    if ok:
        assert VMConfig(vm_id=vm_id).vm_id == vm_id
    else:
        with pytest.raises(ValidationError):
            VMConfig(vm_id=vm_id)


def test_command_result_properties():
    r = CommandResult(0, "  hi\n", "")
    assert r.ok and r.output == "hi"
    assert not CommandResult(3, "", "boom").ok
    b = CommandResult.from_bytes(1, b"\xff\xfeA", b"")
    assert b.stdout_bytes == b"\xff\xfeA" and "A" in b.stdout


def test_merge_boot_args_keeps_user_values():
    merged = merge_boot_args("console=ttyS0 panic=1 init=/init", ["panic=-1", "quiet", "tsc_early_khz=1"])
    assert merged.split() == ["console=ttyS0", "panic=1", "init=/init", "quiet", "tsc_early_khz=1"]


def test_a_qcow2_rootfs_with_a_backing_file_is_refused(tmp_path: Path) -> None:
    """QEMU would follow the backing chain to any host file the image names."""
    import subprocess

    base, over, flat = tmp_path / "base.raw", tmp_path / "over.qcow2", tmp_path / "flat.qcow2"
    base.write_bytes(b"\0" * 65536)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(over)], check=True
    )
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(flat), "1M"], check=True)
    with pytest.raises(ValidationError, match="backing file"):
        VMConfig(rootfs_path=over)
    assert VMConfig(rootfs_path=flat).rootfs_path == flat.resolve()


def test_host_limits_refuse_a_vm_bigger_than_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config may come from an agent: one VM cannot ask for more than the host has."""
    import os

    from smolvm.runtime import hostlimits

    hostlimits.check(VMConfig(vcpu_count=1, mem_size_mib=256))
    with pytest.raises(ValidationError, match="SMOLVM_MAX_VCPUS") as e:
        hostlimits.check(VMConfig(vcpu_count=(os.cpu_count() or 1) + 1))
    assert e.value.details["field"] == "vcpu_count"
    with pytest.raises(ValidationError, match="SMOLVM_MAX_MEM_MIB"):
        hostlimits.check(VMConfig(mem_size_mib=min(65536, hostlimits.host_mem_mib() + 1024)))
    monkeypatch.setenv("SMOLVM_MAX_DISK_MIB", "1024")
    with pytest.raises(ValidationError, match="disk_size_mib=2048"):
        hostlimits.check(VMConfig(disk_size_mib=2048))
    monkeypatch.setenv("SMOLVM_MAX_VCPUS", "64")
    hostlimits.check(VMConfig(vcpu_count=(os.cpu_count() or 1) + 1))  # raised by the operator


def test_boot_files_must_come_from_the_image_dir_or_a_trusted_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_image
) -> None:
    import os

    from smolvm import SmolVMManager
    from smolvm.runtime import hostlimits

    with SmolVMManager(data_dir=tmp_path / "data") as mgr:
        # A config handing a host secret to the guest as its disk is refused, nothing recorded.
        with pytest.raises(ValidationError, match="outside the image dir") as e:
            mgr.create(VMConfig(kernel_path=default_image.kernel, rootfs_path=Path("/etc/shadow")))
        assert e.value.field == "rootfs_path" and mgr.list_vms() == []
        # A symlink inside the image dir is followed before the check.
        link = mgr.image_dir / "sneaky.ext4"
        link.symlink_to("/etc/shadow")
        try:
            with pytest.raises(ValidationError, match="outside the image dir"):
                mgr.create(VMConfig(kernel_path=default_image.kernel, rootfs_path=link))
        finally:
            link.unlink()
    mine = tmp_path / "kernels"
    mine.mkdir()
    k = mine / "vmlinux"
    k.write_bytes(b"\0" * 64)
    roots = hostlimits.trusted_roots(tmp_path / "images")
    with pytest.raises(ValidationError, match="SMOLVM_TRUSTED_PATHS"):
        hostlimits.check_paths(VMConfig(kernel_path=k), roots)
    monkeypatch.setenv("SMOLVM_TRUSTED_PATHS", f"/nonexistent{os.pathsep}{mine}")
    roots = hostlimits.trusted_roots(tmp_path / "images")
    hostlimits.check_paths(VMConfig(kernel_path=k), roots)  # trusted by the operator
    k.chmod(0o666)
    with pytest.raises(ValidationError, match="another user"):
        hostlimits.check_paths(VMConfig(kernel_path=k), roots)
    fifo = mine / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValidationError, match="kernel_path"):  # VMConfig wants a file already
        hostlimits.check_paths(VMConfig(kernel_path=fifo), roots)
