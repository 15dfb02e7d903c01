"""Image building: cache reuse, artefact formats, custom SSH images, offline Alpine."""

from __future__ import annotations

import io
import lzma
import tarfile
from pathlib import Path

import paramiko
import pytest

from conftest import IMAGE_DIR
from smolvm import ImageBuilder, VMConfig
from smolvm.build import SSH_BOOT_ARGS
from smolvm.exceptions import ImageError, ValidationError
from smolvm.images.configdisk import build_config_disk
from smolvm.images.cpio import CpioWriter
from smolvm.images.kernel import MODULE_SIG_MAGIC, extract_vmlinux, without_signature


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_writer_roundtrip(tmp_path: Path):
    w = CpioWriter()
    w.dir("bin")
    w.file("bin/x", b"hello", 0o755)
    w.symlink("bin/sh", "busybox")
    w.chardev("dev/console", 5, 1)
    data = w.write(tmp_path / "a.cpio").read_bytes()
    assert len(data) % 512 == 0
    ents = parse_newc(data)
    assert ents["bin/x"] == (0o100755, b"hello")
    assert ents["bin/sh"][1] == b"busybox"
    assert ents["dev/console"][0] == 0o020600


def test_config_disk_is_a_tar_the_guest_can_read(tmp_path: Path):
    p = build_config_disk(
        tmp_path / "c.tar", {"hostname": "h1\n", "env.sh": "export A='b'\n"}, {"vm_id": "h1"}
    )
    data = p.read_bytes()
    assert data[257:262] == b"ustar" and len(data) % 65536 == 0
    assert oct(p.stat().st_mode & 0o777) == oct(0o600)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.extractfile("hostname").read() == b"h1\n"
        assert b'"vm_id": "h1"' in t.extractfile("meta.json").read()


def test_extract_vmlinux_finds_xz_payload(tmp_path: Path):
    elf = b"\x7fELF" + b"\x02" * 4000
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(b"MZ" + b"\x00" * 100 + b"\xfd7zXZ\x00junk" + lzma.compress(elf) + b"\x00" * 64)
    assert extract_vmlinux(bz, tmp_path / "vmlinux").read_bytes() == elf
    bad = tmp_path / "bad"
    bad.write_bytes(b"nothing here")
    with pytest.raises(ImageError):
        extract_vmlinux(bad, tmp_path / "o")


def test_default_image_is_cached_and_well_formed(default_image):
    b = ImageBuilder(IMAGE_DIR)
    again = b.ensure_default()
    assert again.manifest["built_at"] == default_image.manifest["built_at"]  # no rebuild
    assert b.is_current()
    assert default_image.has_agent and default_image.has_ssh
    assert default_image.kernel.read_bytes()[:4] == b"\x7fELF"  # uncompressed PVH vmlinux
    ents = parse_newc(default_image.initrd.read_bytes())
    assert "init" in ents and "bin/busybox" in ents
    mods = ents["lib/modules/order"][1].decode().split()
    assert mods.index("virtio_mmio.ko") < mods.index("virtio_blk.ko")
    assert "crc32c-intel.ko" not in mods and "ext4.ko" in mods
    # vsock (Firecracker's agent channel) loads only when the VM has a vsock device.
    assert "vsock.ko" not in mods and "vsock.ko" in ents["lib/modules/order.vsock"][1].decode().split()
    # No module carries a signature: the guest would hash each one at every boot.
    for name, (_mode, data) in ents.items():
        if name.endswith(".ko"):
            assert not data.endswith(MODULE_SIG_MAGIC), name
            assert data[:4] == b"\x7fELF", name
    with open(default_image.rootfs, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"  # ext4 magic
        f.seek(1144)
        assert f.read(11) == b"smolvm-root"
    assert default_image.manifest["kernel"]["package"].startswith("linux-image-")


def test_module_signatures_are_cut_exactly():
    body = b"\x7fELF" + bytes(range(256)) * 40
    sig = b"\x30\x82" + b"s" * 500  # PKCS#7 blob stand-in
    info = bytes(8) + len(sig).to_bytes(4, "big")  # struct module_signature: sig_len last
    assert without_signature(body + sig + info + MODULE_SIG_MAGIC) == body
    assert without_signature(body) == body  # unsigned: unchanged
    with pytest.raises(ImageError, match="malformed"):
        without_signature(b"x" + (10**6).to_bytes(12, "big") + MODULE_SIG_MAGIC)


def test_input_change_changes_cache_key():
    b = ImageBuilder(IMAGE_DIR)
    k1 = b.local_inputs_key(["a"], 1024, None, "debian")
    assert k1 == b.local_inputs_key(["a"], 1024, None, "debian")
    assert k1 != b.local_inputs_key(["a", "b"], 1024, None, "debian")
    assert k1 != b.local_inputs_key(["a"], 2048, None, "debian")


def test_bad_image_names(tmp_path: Path):
    b = ImageBuilder(tmp_path)
    for name in ("", "../x", ".hidden", "_kernels"):
        with pytest.raises(ValidationError):
            b.build_image(name)
    with pytest.raises(ImageError):
        b.remove("nope")


def test_alpine_offline_names_the_mirror(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SMOLVM_ALPINE_MIRROR", "http://alpine-mirror.invalid/alpine")
    with pytest.raises(ImageError) as ei:
        ImageBuilder(IMAGE_DIR).build_alpine_ssh("alp", "pw", 512)
    msg = str(ei.value)
    assert "alpine-mirror.invalid" in msg and "build_debian_ssh" in msg


@pytest.mark.e2e
def test_custom_debian_ssh_image_with_password(vms):
    """Seed 003's manual flow with our offline builder: build, configure, boot, log in."""
    builder = ImageBuilder(IMAGE_DIR)
    kernel, rootfs = builder.build_debian_ssh(
        name="test-custom", ssh_password="secure-password", rootfs_size_mb=1024
    )
    config = VMConfig(
        vm_id="my-vm",
        vcpu_count=2,
        mem_size_mib=1024,
        kernel_path=kernel,
        rootfs_path=rootfs,
        boot_args=SSH_BOOT_ARGS,
    )
    vm = vms.sandbox(config)
    vm.start()
    assert vm.get_ip() == "10.0.2.15"
    assert vm.run("nproc").output == "2"
    assert vm.run("df -m / | awk 'NR==2{print $2}'").output.isdigit()
    # Password login works on this image (the default image allows keys only).
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect(
        "127.0.0.1",
        vm.info.network.ssh_host_port,
        username="root",
        password="secure-password",
        look_for_keys=False,
        allow_agent=False,
        timeout=30,
    )
    _, out, _ = c.exec_command("echo pw-ok")
    assert out.read().strip() == b"pw-ok"
    c.close()
    vm.stop()
    vm.delete()
    builder.remove("test-custom")


@pytest.mark.requires("root")
def test_apt_download_dir_belongs_to_apt_not_everyone(tmp_path):
    """As root, apt downloads as `_apt`: the directory is that user's, 0700, never 0777."""
    import pwd

    from smolvm.images import kernel

    d = tmp_path / "apt"
    d.mkdir(mode=0o755)
    kernel._give_to_apt(d)
    st = d.stat()
    assert st.st_uid == pwd.getpwnam("_apt").pw_uid and st.st_mode & 0o777 == 0o700
