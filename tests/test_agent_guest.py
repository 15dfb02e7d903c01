"""The agent as PID 1 of a real QEMU guest (TCG), over virtio-serial. Slow: marked e2e.

The guest is the default image's kernel and stage-1 initramfs plus a small overlay whose
/init loads the virtio modules and execs the freshly built agent with --pid1, so these
tests exercise exactly the C sources in the tree.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from smolvm.exceptions import OperationTimeoutError
from smolvm.guest import build_agent
from smolvm.transports.agent import AgentTransport
from smolvm.transports.base import ExecRequest

pytestmark = [pytest.mark.e2e, pytest.mark.requires("qemu")]

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /root
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t tmpfs tmp /tmp
/bin/busybox --install -s /bin
for m in virtio_ring virtio virtio_mmio virtio_console; do insmod /lib/modules/$m.ko 2>/dev/null; done
exec /usr/lib/smolvm/agent --pid1
"""


def _tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 0


def _cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


@pytest.fixture(scope="module")
def guest(default_image, tmp_path_factory):
    from smolvm.images.cpio import CpioWriter

    d = tmp_path_factory.mktemp("agentguest")
    agent = build_agent(d / "agent")
    w = CpioWriter()
    for name in ("usr", "usr/lib", "usr/lib/smolvm"):
        w.dir(name)
    w.file("usr/lib/smolvm/agent", agent.read_bytes(), 0o755)
    w.symlink("usr/lib/smolvm/sh", "/bin/busybox")
    w.file("init", INIT.encode(), 0o755)
    overlay = w.write(d / "overlay.cpio")
    initrd = d / "initrd.cpio"
    # The kernel unpacks concatenated archives in order: our /init replaces stage 1's.
    initrd.write_bytes(Path(default_image.initrd).read_bytes() + overlay.read_bytes())
    sock, log = d / "agent.sock", d / "serial.log"
    append = (
        f"console=ttyS0 quiet tsc_early_khz={_tsc_khz()} reboot=t panic=-1 cryptomgr.notests "
        "8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp random.trust_cpu=on audit=0 "
        "nowatchdog no_timer_check pci=off"
    )
    argv = [
        "qemu-system-x86_64",
        "-name",
        "smolvm-agent-e2e",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-m",
        "256",
        "-smp",
        "1",
        "-M",
        "microvm,accel=tcg,acpi=on",
        "-kernel",
        str(default_image.kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
        "-device",
        "virtio-serial-device,id=vs0",
        "-chardev",
        f"socket,id=ch0,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,bus=vs0.0,chardev=ch0,name=smolvm.agent",
        # A second agent port (SmolVM's QEMU VMs have four): an independent channel.
        "-chardev",
        f"socket,id=ch1,path={sock.with_name('agent1.sock')},server=on,wait=off",
        "-device",
        "virtserialport,bus=vs0.0,chardev=ch1,name=smolvm.agent.1",
    ]
    with open(log, "wb") as out:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 90
        while b"SMOLVM_READY" not in log.read_bytes():
            assert qemu.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < end, "no SMOLVM_READY: " + log.read_text(errors="replace")[-2000:]
            time.sleep(0.05)
        yield qemu, sock
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()


def _t(sock: Path) -> AgentTransport:
    t = AgentTransport(sock, connect_timeout=30)
    t.wait_ready(30)
    return t


def test_guest_exec_and_latency(guest, capsys):
    _, sock = guest
    t = _t(sock)
    try:
        r = t.exec(ExecRequest("echo $HOME; pwd; echo e >&2; exit 4"))
        assert (r.exit_code, r.stdout, r.stderr) == (4, "/root\n/root\n", "e\n")
        samples = []
        for _ in range(60):
            t0 = time.perf_counter()
            assert t.exec(ExecRequest("true")).ok
            samples.append(time.perf_counter() - t0)
        samples.sort()
        with capsys.disabled():
            print(f"\n[guest agent, TCG] exec 'true' median {samples[30] * 1e3:.1f} ms")
    finally:
        t.close()


def test_guest_files_and_control_ops(guest):
    _, sock = guest
    t = _t(sock)
    try:
        data = os.urandom(2 * 1024 * 1024 + 7)
        t.write_file("/tmp/blob", data, mode=0o750)
        assert t.read_file("/tmp/blob") == data
        assert t.exec(ExecRequest("stat -c %a /tmp/blob")).stdout == "750\n"
        t.sync_time()
        guest_now = float(t.exec(ExecRequest("date +%s")).stdout)
        assert abs(guest_now - time.time()) < 5
        t.add_entropy(os.urandom(512))
        t.set_hostname("agent-e2e")
        assert t.exec(ExecRequest("hostname")).stdout == "agent-e2e\n"
    finally:
        t.close()


def test_guest_timeout_kills_group(guest):
    _, sock = guest
    t = _t(sock)
    try:
        with pytest.raises(OperationTimeoutError):
            t.exec(ExecRequest("sleep 300 & wait", timeout=1))
        assert "sleep 300" not in t.exec(ExecRequest("ps", shell="raw")).stdout
    finally:
        t.close()


def test_guest_new_host_ends_old_session(guest):
    _, sock = guest
    t1 = _t(sock)
    h = t1.spawn(ExecRequest("exec sleep 301", timeout=None))
    assert h.is_running()
    t1.close()
    t2 = _t(sock)
    try:
        assert "sleep 301" not in t2.exec(ExecRequest("ps", shell="raw")).stdout
    finally:
        t2.close()


def test_guest_ports_are_independent_channels(guest):
    """A HELLO on one port ends only that port's previous session."""
    _, sock = guest
    sock1 = sock.with_name("agent1.sock")
    t0 = _t(sock)
    try:
        h = t0.spawn(ExecRequest("exec sleep 302", timeout=None))
        for _ in range(3):  # new hosts on the other port, one after the other
            t1 = _t(sock1)
            try:
                assert t1.exec(ExecRequest("echo port1")).stdout == "port1\n"
                h1 = t1.spawn(ExecRequest("exec sleep 303", timeout=None))
            finally:
                t1.close()
        assert h.is_running()
        ps = t0.exec(ExecRequest("ps", shell="raw")).stdout
        assert "sleep 302" in ps
        end = time.monotonic() + 5  # port 1's host hung up: its command ends
        while "sleep 303" in t0.exec(ExecRequest("ps", shell="raw")).stdout:
            assert time.monotonic() < end, "the hung-up port's command must be killed"
            time.sleep(0.1)
        assert h1.pid not in (None, h.pid)
        h.kill()
        assert h.wait(10).exit_code != 0
    finally:
        t0.close()


def test_guest_idle_without_host_does_not_spin(guest):
    """With no host connected the port reports POLLHUP; the agent must not busy-poll."""
    qemu, sock = guest
    time.sleep(0.5)
    a = _cpu_ticks(qemu.pid)
    time.sleep(3)
    used = (_cpu_ticks(qemu.pid) - a) / os.sysconf("SC_CLK_TCK") / 3
    assert used < 0.6, f"QEMU used {used:.0%} of a core while the agent was idle"
    t = _t(sock)  # and it still answers afterwards
    try:
        assert t.exec(ExecRequest("echo back")).stdout == "back\n"
    finally:
        t.close()


def test_guest_shutdown_powers_off(guest):
    """Runs last in this module: the VM is gone afterwards."""
    qemu, sock = guest
    t = _t(sock)
    t.shutdown()
    assert qemu.wait(60) == 0
