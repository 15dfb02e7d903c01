"""Seed 002 semantics against real guests, over both channels (guest agent and SSH)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import qemu_pids_for
from smolvm import SmolVM
from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
)
from smolvm.transports.base import ExecRequest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pair(tmp_path_factory, default_image):
    """One sandbox per channel, shared by the module (each boot costs ~3-4 s under TCG)."""
    d = tmp_path_factory.mktemp("cmds")
    boxes = {}
    try:
        for ch in ("agent", "ssh"):
            vm = SmolVM(data_dir=d, comm_channel=ch)
            boxes[ch] = vm
            vm.start()
        yield boxes
    finally:
        for vm in boxes.values():
            vm_id = vm.vm_id
            vm.__exit__(None, None, None)
            assert qemu_pids_for(vm_id) == []


@pytest.fixture(params=["agent", "ssh"])
def vm(request, pair) -> SmolVM:
    return pair[request.param]


def test_channel_is_the_requested_one(vm):
    vm.run("true")
    assert vm.channel == vm.info.config.comm_channel


def test_basic_result(vm):
    r = vm.run("echo 'Hello from SmolVM'")
    assert r.exit_code == 0 and r.ok
    assert r.stdout == "Hello from SmolVM\n" and r.output == "Hello from SmolVM"
    assert r.stderr == ""
    assert vm.run("whoami").output == "root"


def test_exit_code_and_stderr(vm):
    r = vm.run("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (7, "out\n", "err\n", False)
    assert vm.run("false").exit_code == 1
    assert vm.run("nonexistent-cmd-xyz").exit_code == 127


def test_killed_by_signal_reports_128_plus_n(vm):
    assert vm.run("kill -TERM $$").exit_code == 128 + 15


def test_multiline_script_and_set_e(vm):
    script = """
set -e
echo one
false
echo never
"""
    r = vm.run(script)
    assert r.exit_code == 1 and r.stdout == "one\n"
    ok = vm.run("a=1\nb=2\necho $((a+b))\n")
    assert ok.output == "3"


def test_chained_and_quoting(vm):
    r = vm.run("mkdir -p /app/data && echo 'Hello World' > /app/data/test.txt && cat /app/data/test.txt")
    assert r.output == "Hello World"
    assert vm.run("test -f /app/data/test.txt && echo 'exists'").output == "exists"
    code = 'import sys\nprint(f"Python {sys.version_info.major}")\n'
    assert vm.run(f"python3 -c '{code}'").output == "Python 3"


def test_login_vs_raw_environment(vm):
    vm.set_env_vars({"SMOLVM_T1": "visible"})
    assert vm.run("echo $SMOLVM_T1", shell="login").output == "visible"
    assert vm.run("echo ${SMOLVM_T1:-unset}", shell="raw").output == "unset"
    # The login shell sources /etc/profile, which sets root's PATH.
    assert "/usr/local/sbin" in vm.run("echo $PATH", shell="login").output
    assert vm.run("hostname", shell="raw").output == vm.vm_id


def test_env_quoting_is_literal(vm):
    nasty = {
        "Q1": 'it\'s "quoted"',
        "Q2": "line1\nline2",
        "Q3": "$(touch /tmp/pwned) `id` $HOME",
        "Q4": "back\\slash;&|<>*?",
    }
    vm.set_env_vars(nasty)
    for k, v in nasty.items():
        assert vm.run(f'printf %s "${k}"').stdout == v
    assert vm.run("test -e /tmp/pwned && echo yes || echo no").output == "no"
    listed = vm.list_env_vars()
    assert {k: listed[k] for k in nasty} == nasty
    vm.unset_env_vars(["Q1", "Q2"])
    assert "Q1" not in vm.list_env_vars()
    assert vm.run("echo ${Q1:-gone}").output == "gone"


def test_env_key_validation(vm):
    with pytest.raises(ValidationError):
        vm.set_env_vars({"BAD-KEY": "x"})
    with pytest.raises(ValidationError):
        vm.set_env_vars({"1X": "x"})


def test_timeout_kills_guest_process_and_vm_stays_usable(vm):
    marker = f"smolvm-sleeper-{vm.channel}"
    t0 = time.monotonic()
    with pytest.raises(OperationTimeoutError) as ei:
        vm.run(f"sh -c 'sleep 300; echo {marker}' & sleep 300", timeout=2)
    assert time.monotonic() - t0 < 10
    assert "timed out" in ei.value.message
    assert isinstance(ei.value, SmolVMError) and isinstance(ei.value, TimeoutError)
    time.sleep(0.5)
    assert vm.run("ps -ef | grep -c '[s]leep 300' || true").output == "0"
    assert vm.run("echo still-alive").output == "still-alive"


def test_large_output_100mb(vm):
    r = vm.run("head -c 100000000 /dev/zero | tr '\\0' 'x'", timeout=120)
    assert r.ok and len(r.stdout) == 100_000_000
    assert set(r.stdout[:1000]) == {"x"}


def test_binary_output(vm):
    r = vm.run(
        "head -c 65536 /dev/urandom | tee /tmp/rand.bin | sha256sum | cut -d' ' -f1; cat /tmp/rand.bin >&2"
    )
    digest = r.stdout.strip()
    assert hashlib.sha256(r.stderr_bytes).hexdigest() == digest
    raw = vm.run("printf '\\377\\376\\000\\001'")
    assert raw.stdout_bytes == b"\xff\xfe\x00\x01"


def test_streaming_callbacks_arrive_before_exit(vm):
    seen: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    r = vm.run(
        "echo first; sleep 2; echo second", on_stdout=lambda b: seen.append((time.monotonic() - t0, b))
    )
    assert r.stdout == "first\nsecond\n"
    assert b"".join(b for _, b in seen) == b"first\nsecond\n"
    first_at = next(t for t, b in seen if b"first" in b)
    assert first_at < 1.5, f"first chunk arrived only after {first_at:.2f}s"


def test_background_handle(vm):
    h = vm.spawn("echo started; sleep 30; echo never")
    deadline = time.monotonic() + 10
    while b"started" not in h.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"started" in h.stdout and h.is_running()
    with pytest.raises(OperationTimeoutError):
        h.wait(timeout=0.2)
    h.kill()
    res = h.wait(timeout=10)
    assert not h.is_running() and res.exit_code != 0
    assert "never" not in res.stdout
    done = vm.spawn("echo quick; exit 4").wait(timeout=10)
    assert (done.exit_code, done.stdout) == (4, "quick\n")


def test_upload_download_roundtrip_keeps_mode(vm, tmp_path: Path):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    src.chmod(0o751)
    vm.upload_file(src, "/root/blob.bin")
    assert vm.run("stat -c %a /root/blob.bin").output == "751"
    remote = vm.run("sha256sum /root/blob.bin | cut -d' ' -f1").output
    assert remote == hashlib.sha256(src.read_bytes()).hexdigest()
    vm.run("printf 'guest data' > /root/g.txt && chmod 640 /root/g.txt")
    dst = tmp_path / "g.txt"
    vm.download_file("/root/g.txt", dst)
    assert dst.read_text() == "guest data"
    assert oct(dst.stat().st_mode & 0o777) == oct(0o640)
    with pytest.raises(SmolVMError):
        vm.download_file("/nonexistent/file", tmp_path / "x")
    with pytest.raises(ValidationError):
        vm.upload_file(tmp_path / "missing", "/root/x")


def test_download_never_carries_dangerous_modes_or_follows_symlinks(vm, tmp_path: Path):
    """The guest is hostile: a setuid, sticky or world-writable guest file lands 0755 or
    less, and a symlink at the destination is replaced, never written through."""
    vm.run("cp /bin/true /root/suid && chmod 6777 /root/suid && printf x > /root/ww && chmod 1777 /root/ww")
    for name, want in (("suid", 0o755), ("ww", 0o755)):
        dst = tmp_path / name
        vm.download_file(f"/root/{name}", dst)
        assert dst.stat().st_mode & 0o7777 == want, (name, oct(dst.stat().st_mode))
    victim = tmp_path / "victim"
    victim.write_text("host file")
    link = tmp_path / "link"
    link.symlink_to(victim)
    vm.download_file("/root/ww", link)
    assert victim.read_text() == "host file" and not link.is_symlink() and link.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_download_stops_at_max_bytes_and_leaves_nothing(vm, tmp_path: Path):
    """A guest file larger than ``max_bytes`` raises TransferLimitError mid-stream; nothing
    (not even a temporary file) is left on the host, and the channel still works."""
    from smolvm import TransferLimitError

    vm.run("head -c 3000000 /dev/zero > /root/big", shell="raw")
    dst = tmp_path / "big"
    with pytest.raises(TransferLimitError, match="max_bytes=1000000"):
        vm.download_file("/root/big", dst, max_bytes=1_000_000)
    assert list(tmp_path.iterdir()) == []
    vm.download_file("/root/big", dst, max_bytes=3_000_000)  # exactly at the limit: fine
    assert dst.stat().st_size == 3_000_000
    assert vm.run("echo still-ok").output == "still-ok"


def test_async_run(vm):
    async def main():
        return await asyncio.gather(vm.arun("echo a"), vm.arun("echo b"))

    a, b = asyncio.run(main())
    assert (a.output, b.output) == ("a", "b")


def test_invalid_arguments(vm):
    with pytest.raises(ValidationError):
        vm.run("echo x", shell="zsh")
    with pytest.raises(ValidationError):
        vm.run("")
    with pytest.raises(ValidationError):
        vm.run("echo x", timeout=0)


def test_channels_give_identical_results(pair):
    cmds = [
        "echo hi",
        "echo err >&2; exit 3",
        "printf 'a\\nb'",
        "echo $0",
        "cd /tmp && pwd",
        "read x; echo got:$x",
        "umask",
        "id -u",
    ]
    for c in cmds:
        a, s = pair["agent"].run(c, shell="raw"), pair["ssh"].run(c, shell="raw")
        assert (a.exit_code, a.stdout, a.stderr) == (s.exit_code, s.stdout, s.stderr), c


def test_ssh_reconnects_after_server_restart(pair):
    vm = pair["ssh"]
    assert vm.run("echo before").output == "before"
    old = set(vm.run("pidof dropbear", shell="raw").output.split())
    assert old, "no SSH server running"
    connects = vm._transport.connects
    # Kill every dropbear (ours included) and start a fresh server; the next run reconnects.
    vm.spawn(
        "sleep 0.5; pkill dropbear; /usr/sbin/dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -s"
    )
    t = vm.manager.transport(vm.vm_id, "agent")  # watch the restart from the side
    try:
        listening = "grep -q ':0016 00000000:0000 0A' /proc/net/tcp /proc/net/tcp6 && pidof dropbear"
        deadline = time.monotonic() + 30
        while True:
            r = t.exec(ExecRequest(listening, "raw", 10))
            new = set(r.stdout.split())
            if r.ok and new and not (new & old):
                break
            assert time.monotonic() < deadline, f"server did not restart: {r}"
            time.sleep(0.05)
    finally:
        t.close()
    assert vm.run("echo after").output == "after"
    assert vm._transport.connects == connects + 1, "the run was served by a new connection"


def test_ssh_commands_work_when_pasted(pair, tmp_path: Path):
    vm = pair["ssh"]
    cmds = vm.ssh_commands()
    assert "StrictHostKeyChecking=no" not in cmds["ssh"]
    out = subprocess.run(
        cmds["ssh"] + " echo via-ssh",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "via-ssh"
    assert "Warning" not in out.stderr
    f = tmp_path / "up.txt"
    f.write_text("scp works")
    up = cmds["scp_to_guest"].replace("<local>", shlex.quote(str(f))).replace("<remote>", "/root/up.txt")
    assert subprocess.run(up, shell=True, capture_output=True, timeout=60).returncode == 0
    assert vm.run("cat /root/up.txt").output == "scp works"
    down = (
        cmds["scp_from_guest"]
        .replace("<remote>", "/root/up.txt")
        .replace("<local>", shlex.quote(str(tmp_path / "down.txt")))
    )
    assert subprocess.run(down, shell=True, capture_output=True, timeout=60).returncode == 0
    assert (tmp_path / "down.txt").read_text() == "scp works"
    mgr_cmds = vm.manager.get_ssh_commands(vm.vm_id, ssh_user="root", public_host="example.org")
    assert set(mgr_cmds) == {"private_ip", "localhost_port", "public"}
    assert "root@example.org" in mgr_cmds["public"] and "root@10.0.2.15" in mgr_cmds["private_ip"]


def test_wrong_host_key_is_refused(pair):
    """The pinned key is enforced: a VM answering with another key is rejected."""
    from smolvm.keys import HostKey
    from smolvm.transports.ssh import SSHTransport

    vm = pair["ssh"]
    other = HostKey.generate()
    t = SSHTransport(
        "127.0.0.1",
        vm.info.network.ssh_host_port,
        key_path=vm.data_dir / "keys/id_ed25519",
        host_key_alias="x",
        host_public_key=other.public_line,
        vm_id=vm.vm_id,
    )
    with pytest.raises(SmolVMError):
        t.wait_ready(3)
    t.close()


def test_commands_unavailable_when_stopped(vms):
    vm = vms.sandbox()
    with pytest.raises(CommandExecutionUnavailableError) as ei:
        vm.run("true")
    assert ei.value.remediation and "start" in ei.value.remediation
    assert not vm.can_run_commands()


def test_env_survives_stop_start(vms):
    vm = vms.sandbox(env_vars={"FROM_CONFIG": "cfg"}).start()
    assert vm.run("echo $FROM_CONFIG").output == "cfg"
    vm.set_env_vars({"API_KEY": "secret-123"})
    vm.stop()
    vm.start()
    assert vm.run("echo $API_KEY $FROM_CONFIG").output == "secret-123 cfg"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_output_is_bounded_and_capture_false_keeps_nothing(vm):
    cap = 1 << 20
    r = vm.run("yes | head -c 67108864", shell="raw", timeout=120, max_output_bytes=cap)
    assert r.ok and r.truncated and len(r.stdout_bytes or b"") == cap
    seen = [0]
    r = vm.run(
        "yes | head -c 67108864",
        shell="raw",
        timeout=120,
        capture=False,
        on_stdout=lambda b: seen.__setitem__(0, seen[0] + len(b)),
    )
    assert r.ok and r.stdout == "" and seen[0] == 64 << 20
    small = vm.run("echo hi", shell="raw")
    assert small.output == "hi" and not small.truncated
    with pytest.raises(ValidationError, match="max_output_bytes"):
        vm.run("true", max_output_bytes=-1)


def test_an_output_flood_does_not_grow_the_host(vm):
    cap = 8 << 20
    before = _rss_kib()
    r = vm.run("timeout 8 yes; true", shell="raw", timeout=60, max_output_bytes=cap)
    grew_mib = (_rss_kib() - before) / 1024
    assert r.truncated and len(r.stdout_bytes or b"") == cap
    assert grew_mib < cap / (1 << 20) + 64, f"host RSS grew {grew_mib:.0f} MiB"


def test_a_raising_output_callback_stops_the_command(vm):
    class Stop(Exception):
        pass

    def cb(chunk: bytes) -> None:
        raise Stop("enough")

    t0 = time.monotonic()
    with pytest.raises(Stop):
        vm.run(
            "for i in $(seq 200); do echo marker-cb-$i; sleep 0.1; done",
            shell="raw",
            timeout=60,
            on_stdout=cb,
        )
    assert time.monotonic() - t0 < 10  # not the 20 s the loop would take
    end = time.monotonic() + 10
    while vm.run("ps -o args | grep -c '[m]arker-cb' || true", shell="raw").output != "0":
        assert time.monotonic() < end, "the command kept running after its callback raised"
        time.sleep(0.1)
    assert vm.run("echo still-fine").output == "still-fine"
