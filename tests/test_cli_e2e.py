"""The ``smolvm`` CLI against real guests (subprocesses, TCG here: ~3-6 s per boot).

Boots: one VM shared by the module (created, then started, by the CLI), one `run --rm`
sandbox and one `demo`. Tests run in file order; the last ones stop and delete the
shared VM. Every VM is deleted at teardown, and no QEMU process may survive.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import qemu_pids_for
from test_cli import SMOLVM, Result, cli_env, one_line_error, smolvm

pytestmark = pytest.mark.e2e

VM = "cli-e2e"


class Ctx:
    def __init__(self, data_dir: Path) -> None:
        self.d = data_dir

    def __call__(self, *argv: str, **kw) -> Result:
        return smolvm(self.d, *argv, **kw)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, default_image) -> Iterator[Ctx]:
    """A private data dir holding one running VM, created and started through the CLI."""
    c = Ctx(tmp_path_factory.mktemp("cli-e2e"))
    r = c("create", "--id", VM, "--env", "GREETING=hello world", "--mem", "384")
    assert r.code == 0 and r.out.strip() == VM, str(r)
    try:
        r = c("start", VM, "--timeout", "120")
        assert r.code == 0 and f"started {VM}" in r.err, str(r)
        yield c
    finally:
        for v in smolvm(c.d, "list", "--json").json():
            c("delete", "--force", v["vm_id"])
        leaked = qemu_pids_for(VM)
        for p in leaked:
            os.kill(p, 9)
        assert not leaked, f"QEMU of {VM} survived delete: {leaked}"


def test_list_and_info_json(cli: Ctx) -> None:
    vms = cli("list", "--json").json()
    assert [(v["vm_id"], v["status"]) for v in vms] == [(VM, "running")]
    assert cli("list", "--status", "running", "-q").out.split() == [VM]
    info = cli("info", VM, "--json").json()
    assert info["status"] == "running" and info["pid"] and info["config"]["mem_size_mib"] == 384
    assert info["accelerator"] in ("kvm", "tcg") and info["accelerator_reason"]
    assert info["network"]["ssh_host_port"] and Path(info["serial_log"]).exists()
    r = cli("start", VM)
    assert r.code == 0 and "already running" in r.err, str(r)


def test_port_expose_list_close(cli: Ctx) -> None:
    page = "mkdir -p /srv && cd /srv && echo cli-page > i.html"
    serve = f"{page} && (python3 -m http.server 8000 >/dev/null 2>&1 &)"
    assert cli("run", VM, "--", serve).code == 0
    r = cli("port", "expose", VM, "8000")
    assert r.code == 0, str(r)
    port = int(r.out)
    assert cli("port", "list", VM, "--json").json() == [{"host_port": port, "guest_port": 8000}]
    assert f"127.0.0.1:{port}" in cli("info", VM).out
    deadline = time.monotonic() + 60
    while True:
        try:
            assert (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/i.html", timeout=5).read() == b"cli-page\n"
            )
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert cli("port", "close", VM, str(port)).code == 0
    assert cli("port", "list", VM, "--json").json() == []
    r = cli("port", "close", VM, str(port))
    assert r.code != 0 and "not exposed" in r.err, str(r)
    assert "egress" in cli("info", VM).out and "public internet" in cli("info", VM).out


def _on_a_terminal(cli: Ctx, *argv: str) -> bytes:
    """``smolvm ARGV`` with its stdout on a pseudo-terminal; what the terminal received."""
    import pty

    master, slave = pty.openpty()
    try:
        p = subprocess.run(
            [*SMOLVM, *argv], stdout=slave, stderr=subprocess.PIPE, env=cli_env(cli.d), timeout=120
        )
        os.close(slave)
        slave = -1
        data = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            data += chunk
        assert p.returncode == 0, p.stderr
        return data
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_guest_control_sequences_are_shown_not_obeyed_on_a_terminal(cli: Ctx) -> None:
    evil = r"printf 'a\033]52;c;cHduZWQ=\007b\033[2Jc'"  # clipboard write, clear screen
    shown = _on_a_terminal(cli, "run", VM, "--", evil)
    assert b"\x1b" not in shown and b"a^[]52;c;cHduZWQ=^Gb^[[2Jc" in shown, shown
    raw = _on_a_terminal(cli, "run", VM, "--raw", "--", evil)
    assert b"a\x1b]52;c;cHduZWQ=\x07b\x1b[2Jc" in raw, raw
    # Through a pipe (not a terminal) the bytes are passed on untouched.
    piped = cli("run", VM, "--", evil)
    assert piped.out_bytes == b"a\x1b]52;c;cHduZWQ=\x07b\x1b[2Jc", str(piped)
    # The console log is guest-written too.
    cli("run", VM, "--", "printf '\\033]0;console-title\\007\\n' > /dev/console")
    console = _on_a_terminal(cli, "logs", VM)
    assert b"^[]0;console-title^G" in console and b"\x1b]0;console-title" not in console


def test_run_passes_exit_code_and_separates_streams(cli: Ctx) -> None:
    r = cli("run", VM, "--", "echo to-out; echo to-err >&2; exit 7")
    assert r.code == 7, str(r)
    assert r.out == "to-out\n" and "to-err\n" in r.err and "to-out" not in r.err, str(r)
    assert cli("run", VM, "--", "true").code == 0
    assert cli("run", VM, "--", "false").code == 1


def test_run_argv_quoting_and_login_env(cli: Ctx) -> None:
    # several words: quoted and joined, so an argument with spaces stays one argument
    r = cli("run", VM, "--", "printf", "[%s]\\n", "a b", "c")
    assert r.code == 0 and r.out == "[a b]\n[c]\n", str(r)
    r = cli("run", VM, "--", "sh", "-c", "echo one; echo two")
    assert r.out == "one\ntwo\n", str(r)
    # one word: a shell command line; the login shell loads the VM's env vars
    r = cli("run", VM, "--", 'echo "$GREETING" | tr a-z A-Z')
    assert r.code == 0 and r.out == "HELLO WORLD\n", str(r)
    r = cli("run", VM, "--shell", "raw", "--", 'echo "[$GREETING]"')
    assert r.out == "[]\n", str(r)
    r = cli("run", VM, "-e", "ONLY_HERE=x1", "-w", "/tmp", "--", 'echo "$ONLY_HERE $(pwd)"')
    assert r.out == "x1 /tmp\n", str(r)


def test_run_stdin_binary_output_and_timeout(cli: Ctx) -> None:
    r = cli("run", "-i", VM, "--", "wc -c", input=b"x" * 100_000)
    assert r.code == 0 and r.out.strip() == "100000", str(r)
    r = cli("run", VM, "--", "head -c 3000 /dev/urandom | base64 -d 2>/dev/null; printf '\\000\\377'")
    assert r.out_bytes.endswith(b"\x00\xff"), str(r)
    r = cli("run", "--timeout", "1", VM, "--", "sleep 30")
    assert r.code == 124 and "timed out" in one_line_error(r), str(r)


def test_run_into_closed_pipe_stops_guest_command(cli: Ctx) -> None:
    """`smolvm run ID -- yes | head -2`: ends like a local pipeline (141), guest `yes` killed."""
    p = subprocess.Popen(
        [*SMOLVM, "run", VM, "--", "yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(cli.d),
    )
    assert p.stdout is not None
    assert p.stdout.readline() == b"y\n" and p.stdout.readline() == b"y\n"
    p.stdout.close()
    try:
        code = p.wait(60)
    finally:
        p.kill()
    assert code == 141, p.stderr.read() if p.stderr else ""
    assert p.stderr is not None and b"Traceback" not in p.stderr.read()
    r = cli("run", VM, "--", "pgrep -x yes || echo none")
    assert r.out.strip() == "none", str(r)


def test_env_set_list_unset(cli: Ctx) -> None:
    r = cli("env", "set", VM, "K1=v1", "QUOTE=it's $HOME")
    assert r.code == 0, str(r)
    env = cli("env", "list", VM, "--json").json()
    assert env == {"GREETING": "hello world", "K1": "v1", "QUOTE": "it's $HOME"}
    r = cli("run", VM, "--", 'echo "$K1|$QUOTE"')
    assert r.out == "v1|it's $HOME\n", str(r)
    assert cli("env", "unset", VM, "K1").code == 0
    assert "K1" not in cli("env", "list", VM, "--json").json()
    human = cli("env", "list", VM).out.splitlines()
    assert "GREETING='hello world'" in human and f"QUOTE={shlex.quote('it' + chr(39) + 's $HOME')}" in human
    assert cli("info", VM, "--json").json()["config"]["env_vars"]["QUOTE"] == "it's $HOME"


def test_cp_both_ways(cli: Ctx, tmp_path: Path) -> None:
    src = tmp_path / "payload.bin"
    data = os.urandom(200_000) + b"\x00end"
    src.write_bytes(data)
    r = cli("cp", str(src), f"{VM}:/root/up.bin")
    assert r.code == 0, str(r)
    r = cli("run", VM, "--", "wc -c < /root/up.bin")
    assert r.out.strip() == str(len(data)), str(r)
    # a trailing slash (or an existing guest directory) keeps the file name
    assert cli("cp", str(src), f"{VM}:/tmp/").code == 0
    assert cli("cp", str(src), f"{VM}:/var").code == 0
    r = cli(
        "run", VM, "--", "cmp /tmp/payload.bin /root/up.bin && cmp /var/payload.bin /root/up.bin && echo same"
    )
    assert r.out == "same\n", str(r)
    back = tmp_path / "back.bin"
    r = cli("cp", f"{VM}:/root/up.bin", str(back))
    assert r.code == 0 and back.read_bytes() == data, str(r)
    # into a local directory: keeps the guest file name
    r = cli("cp", f"{VM}:/etc/hostname", str(tmp_path))
    assert r.code == 0 and (tmp_path / "hostname").read_text().strip() == VM, str(r)
    r = cli("cp", f"{VM}:/no/such/file", str(tmp_path / "x"))
    assert r.code == 1, str(r)
    one_line_error(r)
    r = cli("cp", str(tmp_path / "missing"), f"{VM}:/tmp/")
    assert r.code == 1 and "no such file" in one_line_error(r), str(r)


def test_logs(cli: Ctx) -> None:
    r = cli("logs", VM)
    assert r.code == 0 and "SMOLVM_READY" in r.out, str(r)
    r = cli("logs", VM, "--lines", "2")
    assert r.code == 0 and 1 <= len(r.out.splitlines()) <= 2, str(r)


def test_ssh_print_and_command(cli: Ctx) -> None:
    r = cli("ssh", VM, "--print")
    port = cli("info", VM, "--json").json()["network"]["ssh_host_port"]
    assert r.code == 0 and f"-p {port}" in r.out and "StrictHostKeyChecking=yes" in r.out, str(r)
    r = cli("ssh", VM, "--", "echo", "via-ssh", timeout=120)
    assert r.code == 0 and r.out.strip() == "via-ssh", str(r)


def test_audit_records_cli_runs(cli: Ctx) -> None:
    assert cli("run", VM, "--", "echo audited; exit 3").code == 3
    assert cli("run", "--no-audit", VM, "--", "echo secret-not-audited").code == 0
    recs = cli("audit", VM, "--json", "--limit", "100").json()
    cmds = {r["command"]: r for r in recs}
    assert (
        cmds["echo audited; exit 3"]["exit_code"] == 3 and cmds["echo audited; exit 3"]["status"] == "failed"
    )
    assert not any("secret-not-audited" in c for c in cmds)
    assert all(r["vm_id"] == VM for r in recs)
    assert len(cli("audit", VM, "--json", "--limit", "1").json()) == 1
    failed = cli("audit", VM, "--json", "--status", "failed", "--since", "1h").json()
    assert failed and all(r["status"] == "failed" for r in failed)
    r = cli("audit", VM)
    assert r.code == 0 and "echo audited; exit 3" in r.out, str(r)


def test_pause_and_resume(cli: Ctx) -> None:
    r = cli("pause", VM)
    assert r.code == 0 and cli("info", VM, "--json").json()["status"] == "paused", str(r)
    try:
        r = cli("run", VM, "--", "true")
        assert r.code == 1 and "paused" in one_line_error(r) and f"smolvm resume {VM}" in r.err, str(r)
        r = cli("pause", VM)
        assert r.code == 1 and "not running" in one_line_error(r), str(r)
    finally:
        r = cli("resume", VM)
    assert r.code == 0, str(r)
    assert cli("run", VM, "--", "echo back").out == "back\n"


def test_snapshot_create_list_restore_rm(cli: Ctx) -> None:
    assert cli("run", VM, "--", "echo before-snapshot > /root/marker").code == 0
    r = cli("snapshot", "create", VM, "cli-snap")
    assert r.code == 0 and r.out.strip() == "cli-snap", str(r)
    snaps = cli("snapshot", "list", "--json").json()
    assert [(s["name"], s["source_vm"]) for s in snaps] == [("cli-snap", VM)]
    assert "cli-snap" in cli("snapshot", "list").out
    assert cli("info", VM, "--json").json()["status"] == "running"  # resumed after the save
    r = cli("snapshot", "restore", "cli-snap", "--id", "cli-clone")
    assert r.code == 0 and r.out.strip() == "cli-clone", str(r)
    try:
        r = cli("run", "cli-clone", "--", "cat /root/marker; hostname")
        assert r.code == 0 and r.out == "before-snapshot\ncli-clone\n", str(r)
        r = cli("snapshot", "rm", "cli-snap")  # a clone still uses it
        assert r.code == 1 and "cli-clone" in one_line_error(r), str(r)
    finally:
        assert cli("delete", "--force", "cli-clone").code == 0
    assert not qemu_pids_for("cli-clone")
    assert cli("snapshot", "rm", "cli-snap").code == 0
    assert cli("snapshot", "list", "--json").json() == []
    r = cli("snapshot", "restore", "cli-snap")
    assert r.code == 1 and "cli-snap" in one_line_error(r), str(r)


def test_delete_running_needs_force(cli: Ctx) -> None:
    r = cli("delete", VM)
    assert r.code == 1 and "running" in one_line_error(r) and "--force" in r.err, str(r)
    assert cli("info", VM, "--json").json()["status"] == "running"


def test_stop_ends_logs_follow_then_delete(cli: Ctx) -> None:
    follow = subprocess.Popen(
        [*SMOLVM, "logs", "--follow", VM],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(cli.d),
    )
    try:
        time.sleep(1.0)
        assert follow.poll() is None  # still following a running VM
        r = cli("stop", VM, "--timeout", "10")
        assert r.code == 0 and f"stopped {VM}" in r.err, str(r)
        out, _ = follow.communicate(timeout=15)  # --follow ends once the VM is down
    finally:
        follow.kill()
    assert follow.returncode == 0 and b"SMOLVM_READY" in out
    assert cli("info", VM, "--json").json()["status"] == "stopped"
    assert not qemu_pids_for(VM)
    r = cli("run", VM, "--", "true")
    assert r.code == 1 and "not running" in one_line_error(r), str(r)
    assert "SMOLVM_READY" in cli("logs", VM).out
    r = cli("delete", VM)
    assert r.code == 0 and f"deleted {VM}" in r.err, str(r)
    assert cli("list", "--json").json() == []
    assert not (cli.d / "vms" / VM).exists() and not (cli.d / "disks" / f"{VM}.qcow2").exists()


def test_run_rm_one_shot(cli: Ctx) -> None:
    r = cli("run", "--rm", "--mem", "256", "-e", "X=42", "--", 'echo "x=$X"; uname -s; exit 5', timeout=240)
    assert r.code == 5 and r.out == "x=42\nLinux\n", str(r)
    assert cli("list", "--json").json() == []  # the sandbox is gone
    assert not list((cli.d / "disks").glob("*.qcow2"))
    recs = cli("audit", "--json").json()
    assert any(rec["command"].startswith('echo "x=$X"') and rec["exit_code"] == 5 for rec in recs)


def test_demo(cli: Ctx) -> None:
    r = cli("demo", timeout=300)
    assert r.code == 0, str(r)
    assert "Hello from SmolVM" in r.out and "Linux" in r.out, str(r)
    assert "booted in" in r.err and "deleted in" in r.err, str(r)
    assert cli("list", "--json").json() == []
