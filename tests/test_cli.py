"""The ``smolvm`` CLI without booting guests: help, usage errors, exit codes, doctor, setup,
and the create/list/info/env/delete/prune bookkeeping of VMs that are never started.

Everything runs the real CLI in a subprocess against a private data dir (the image is
shared through conftest's SMOLVM_IMAGE_DIR). Booting tests are in test_cli_e2e.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_SCRIPT = Path(sys.executable).with_name("smolvm")
#: The installed console script when present (what users run), else ``python -m``.
SMOLVM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "smolvm.cli.main"]


# ---------------------------------------------------------------------- helpers (also used by test_cli_e2e)
@dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    err: str
    out_bytes: bytes

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return (
            f"$ smolvm {' '.join(self.argv)}\nexit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"
        )


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SMOLVM_DATA_DIR"] = str(data_dir)
    env["NO_COLOR"] = "1"
    for k in ("SMOLVM_DEBUG", "FORCE_COLOR", "COLUMNS", "SMOLVM_BACKEND", "SMOLVM_ACCEL"):
        env.pop(k, None)
    env.update(extra)
    return env


def smolvm(
    data_dir: Path,
    *argv: str,
    input: bytes | None = None,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    entry: list[str] | None = None,
) -> Result:
    """Run ``smolvm ARGV...`` against ``data_dir``; never raises on a non-zero exit."""
    p = subprocess.run(
        [*(entry or SMOLVM), *argv],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=env or cli_env(data_dir),
    )
    return Result(
        list(argv),
        p.returncode,
        p.stdout.decode("utf-8", "replace"),
        p.stderr.decode("utf-8", "replace"),
        p.stdout,
    )


def one_line_error(r: Result) -> str:
    """The ``error: …`` line (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in r.err, str(r)
    lines = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, str(r)
    return lines[0]


@pytest.fixture(scope="module")
def ddir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-data")


# ---------------------------------------------------------------------- help and version
COMMANDS = [
    [],
    ["create"],
    ["start"],
    ["stop"],
    ["delete"],
    ["pause"],
    ["resume"],
    ["list"],
    ["info"],
    ["logs"],
    ["reconcile"],
    ["prune"],
    ["run"],
    ["ssh"],
    ["cp"],
    ["env"],
    ["env", "set"],
    ["env", "unset"],
    ["env", "list"],
    ["audit"],
    ["setup"],
    ["doctor"],
    ["image"],
    ["image", "build"],
    ["image", "list"],
    ["image", "rm"],
    ["image", "prune"],
    ["snapshot"],
    ["snapshot", "create"],
    ["snapshot", "restore"],
    ["snapshot", "list"],
    ["snapshot", "rm"],
    ["demo"],
    ["version"],
]


def test_every_command_has_help() -> None:
    """In-process sweep (the real app object) so 30+ commands stay fast."""
    from typer.testing import CliRunner

    from smolvm.cli.main import app

    runner = CliRunner()
    for cmd in COMMANDS:
        res = runner.invoke(app, [*cmd, "--help"], env={"NO_COLOR": "1", "COLUMNS": "120"})
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage:" in res.output and "smolvm" in res.output, (cmd, res.output)


def test_help_and_version_subprocess(ddir: Path) -> None:
    r = smolvm(ddir, "--help")
    assert r.code == 0 and "run" in r.out and "doctor" in r.out, str(r)
    r = smolvm(ddir, "-h")
    assert r.code == 0, str(r)
    import smolvm as pkg

    r = smolvm(ddir, "--version")
    assert r.code == 0 and r.out.strip() == f"smolvm {pkg.__version__}", str(r)
    r = smolvm(ddir, "version", "--json")
    assert r.code == 0 and r.json()["smolvm"] == pkg.__version__ and "qemu" in r.json(), str(r)
    # python -m entry point works too
    r = smolvm(ddir, "version", entry=[sys.executable, "-m", "smolvm.cli.main"])
    assert r.code == 0 and r.out.startswith(f"smolvm {pkg.__version__}"), str(r)


def test_shell_completion_is_available(ddir: Path) -> None:
    # The completion protocol itself (what --install-completion wires into ~/.bashrc);
    # `--show-completion` would guess the shell from the process tree, which a test
    # runner's tree does not always show.
    r = smolvm(ddir, env=cli_env(ddir, _SMOLVM_COMPLETE="source_bash"))
    assert r.code == 0 and "complete -o default -F _smolvm_completion smolvm" in r.out, str(r)
    assert "_SMOLVM_COMPLETE=complete_bash" in r.out, str(r)


def test_no_args_shows_help(ddir: Path) -> None:
    r = smolvm(ddir)
    assert r.code in (0, 2) and "Usage:" in (r.out + r.err), str(r)


# ---------------------------------------------------------------------- exit codes
@pytest.mark.parametrize(
    "argv",
    [
        ["bogus-command"],
        ["list", "--no-such-option"],
        ["list", "--status", "sideways"],
        ["create", "--mem", "10"],
        ["create", "--channel", "pigeon"],
        ["create", "--env", "NOEQUALS"],
        ["create", "--env", "1BAD=x"],
        ["create", "--no-internet", "--allow-domain", "pypi.org"],
        ["create", "--allow-cidr", "10.0.0.0/33"],
        ["create", "--allow-domain", "not a name"],
        ["port", "expose", "some-vm", "0"],
        ["run"],
        ["run", "some-vm"],
        ["run", "--shell", "zsh", "vm", "--", "true"],
        ["cp", "a.txt", "b.txt"],
        ["cp", "vm1:/a", "vm2:/b"],
        ["info"],
        ["audit", "--since", "yesterday"],
        ["--backend", "vmware", "list"],
    ],
)
def test_usage_errors_exit_2(ddir: Path, argv: list[str]) -> None:
    r = smolvm(ddir, *argv)
    assert r.code == 2, str(r)
    one_line_error(r)


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "ghost"],
        ["start", "ghost"],
        ["stop", "ghost"],
        ["delete", "ghost"],
        ["pause", "ghost"],
        ["resume", "ghost"],
        ["run", "ghost", "--", "true"],
        ["logs", "ghost"],
        ["env", "list", "ghost"],
        ["env", "set", "ghost", "A=1"],
        ["ssh", "ghost"],
        ["cp", "ghost:/etc/hostname", "."],
        ["info", "ghost", "--json"],
    ],
)
def test_unknown_vm_exits_1_with_not_found(ddir: Path, argv: list[str]) -> None:
    r = smolvm(ddir, *argv)
    assert r.code == 1, str(r)
    line = one_line_error(r)
    assert "not found" in line and "ghost" in line, str(r)
    assert r.out == "", str(r)  # nothing on stdout for scripts to mistake for data


def test_debug_shows_traceback(ddir: Path) -> None:
    r = smolvm(ddir, "--debug", "info", "ghost")
    assert r.code == 1 and "Traceback" in r.err and "VMNotFoundError" in r.err, str(r)
    r = smolvm(ddir, "info", "ghost", env=cli_env(ddir, SMOLVM_DEBUG="1"))
    assert r.code == 1 and "Traceback" in r.err, str(r)


def test_list_json_empty(tmp_path: Path) -> None:
    r = smolvm(tmp_path, "list", "--json")
    assert r.code == 0 and r.json() == [], str(r)
    r = smolvm(tmp_path, "list")
    assert r.code == 0 and r.out == "" and "no VMs" in r.err, str(r)


def test_global_data_dir_option(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    r = smolvm(tmp_path / "env-dir", "--data-dir", str(other), "doctor", "--json")
    assert r.json()["data_dir"] == str(other.resolve()), str(r)
    assert (other / "state.db").exists()


# ---------------------------------------------------------------------- doctor
def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_doctor_json_shape(ddir: Path, default_image) -> None:
    r = smolvm(ddir, "doctor", "--json")
    rep = r.json()
    assert r.code == (0 if rep["ok"] else 1), str(r)
    names = {c["name"] for c in rep["checks"]}
    assert {
        "qemu",
        "qemu-img",
        "kvm",
        "tsc",
        "tap",
        "nft",
        "musl-gcc",
        "debootstrap",
        "data-dir",
        "disk-space",
        "image",
        "state-db",
    } <= names
    for c in rep["checks"]:
        assert c["status"] in ("ok", "warn", "fail", "info"), c
        if c["status"] in ("warn", "fail"):
            assert c["fix"], f"{c['name']} gives no fix"
    kvm = rep["kvm"]
    assert kvm["present"] == os.path.exists("/dev/kvm")
    if not kvm["present"] or not _cpu_has_virt_flags():
        # No hardware virtualization: KVM cannot be usable, whatever /dev/kvm claims.
        assert kvm["usable"] is False and rep["accel"] == "tcg", rep["kvm"]
    assert rep["accel"] in ("kvm", "tcg") and rep["accel"] == kvm["accel"]
    assert _check(rep, "state-db")["status"] == "ok"
    assert "integrity ok" in _check(rep, "state-db")["detail"]
    assert _check(rep, "image")["status"] == "ok"  # conftest's shared image is built
    # human output: one line per check, verdict on stderr
    r2 = smolvm(ddir, "doctor")
    assert r2.code == r.code and "kvm" in r2.out and "guests will use" in r2.err, str(r2)


def _cpu_has_virt_flags() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return " vmx" in flags or " svm" in flags


@pytest.mark.skipif(
    not os.path.exists("/dev/kvm") or _cpu_has_virt_flags(),
    reason="only on hosts whose /dev/kvm is emulated (no vmx/svm): see platform notes",
)
def test_doctor_reports_emulated_kvm_and_tcg(tmp_path: Path) -> None:
    """This machine kind: /dev/kvm opens but nested virt is emulated → TCG, a warning only."""
    r = smolvm(tmp_path, "doctor", "--json", "--reprobe")
    rep = r.json()
    assert rep["kvm"]["present"] is True
    assert rep["kvm"]["usable"] is False and rep["kvm"]["emulated"] is True
    assert rep["accel"] == "tcg"
    kvm = _check(rep, "kvm")
    assert kvm["status"] == "warn" and "TCG will be used" in kvm["detail"]
    assert "emulated" in kvm["detail"]
    assert rep["ok"] is True and r.code == 0, str(r)  # a warning does not fail doctor


def test_doctor_fails_on_corrupt_state_db(tmp_path: Path) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "state.db").write_bytes(b"this is not a sqlite database" * 100)
    r = smolvm(d, "doctor", "--json")
    rep = r.json()
    assert r.code == 1 and rep["ok"] is False, str(r)
    st = _check(rep, "state-db")
    assert st["status"] == "fail" and st["fix"], st


def test_doctor_fails_on_unusable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = smolvm(blocker / "sub", "doctor", "--json")
    rep = r.json()
    assert r.code == 1 and _check(rep, "data-dir")["status"] == "fail", str(r)


def test_doctor_fails_on_wrong_schema(tmp_path: Path) -> None:
    d = tmp_path / "future"
    smolvm(d, "list")  # creates the database
    with sqlite3.connect(d / "state.db") as c:
        c.execute("PRAGMA user_version=999")
    r = smolvm(d, "doctor", "--json")
    assert r.code == 1 and _check(r.json(), "state-db")["status"] == "fail", str(r)


# ---------------------------------------------------------------------- setup
def test_host_packages_list_and_module_entry() -> None:
    from smolvm.cli.setup import HOST_PACKAGES

    assert "qemu-system-x86" in HOST_PACKAGES and "musl-tools" in HOST_PACKAGES
    assert "debootstrap" in HOST_PACKAGES and len(set(HOST_PACKAGES)) == len(HOST_PACKAGES)
    p = subprocess.run(
        [sys.executable, "-m", "smolvm.cli.setup", "--print-packages"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout.split() == HOST_PACKAGES
    # setup-host.sh runs it as a plain script before any dependency exists (-S: no site-packages)
    import smolvm.cli.setup as setup_mod

    p = subprocess.run(
        [sys.executable, "-S", setup_mod.__file__, "--print-packages"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert p.returncode == 0 and p.stdout.split() == HOST_PACKAGES, p.stderr


def test_setup_dry_run_is_idempotent(ddir: Path) -> None:
    from smolvm.cli.setup import HOST_PACKAGES

    def installed(pkg: str) -> bool:  # asked of dpkg directly, not of the code under test
        q = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        return "install ok installed" in q.stdout

    missing = [p for p in HOST_PACKAGES if not installed(p)]
    r = smolvm(ddir, "setup", "--dry-run")
    assert r.code == 0, str(r)
    if missing:
        assert "would install" in r.err and all(p in r.err for p in missing), str(r)
    else:
        assert "all" in r.err and "installed" in r.err, str(r)
    assert "accelerator:" in r.err and "default image" in r.err, str(r)


@pytest.mark.requires("root", "host-packages")
def test_setup_installs_nothing_when_complete(ddir: Path) -> None:
    r = smolvm(ddir, "setup", "--no-image")
    assert r.code == 0 and "apt-get" not in r.err, str(r)


# ---------------------------------------------------------------------- VMs that never boot
def test_created_vm_bookkeeping(tmp_path: Path, default_image) -> None:
    d = tmp_path / "data"
    r = smolvm(
        d,
        "create",
        "--id",
        "cli-idle",
        "--mem",
        "256",
        "--vcpus",
        "2",
        "-e",
        "A=1",
        "-e",
        "B=two words",
        "--port",
        "18080:80",
    )
    assert r.code == 0 and r.out.strip() == "cli-idle", str(r)
    try:
        r = smolvm(d, "create", "--id", "cli-idle")
        assert r.code == 1 and "already exists" in one_line_error(r), str(r)

        vms = smolvm(d, "list", "--json").json()
        assert [v["vm_id"] for v in vms] == ["cli-idle"] and vms[0]["status"] == "created"
        assert smolvm(d, "list", "--status", "running", "--json").json() == []
        assert smolvm(d, "list", "-q").out.split() == ["cli-idle"]

        info = smolvm(d, "info", "cli-idle", "--json").json()
        assert info["config"]["mem_size_mib"] == 256 and info["config"]["vcpu_count"] == 2
        assert info["config"]["env_vars"] == {"A": "1", "B": "two words"}
        assert info["network"]["port_forwards"] == {"18080": 80}
        assert info["ssh_command"].startswith("ssh ") and "StrictHostKeyChecking=yes" in info["ssh_command"]
        human = smolvm(d, "info", "cli-idle")
        assert human.code == 0 and "created" in human.out and "256 MiB" in human.out, str(human)

        # env on a stopped/created VM edits the stored config (applied at next boot)
        assert smolvm(d, "env", "set", "cli-idle", "C=3").code == 0
        assert smolvm(d, "env", "unset", "cli-idle", "A").code == 0
        assert smolvm(d, "env", "list", "cli-idle", "--json").json() == {"B": "two words", "C": "3"}
        assert smolvm(d, "env", "list", "cli-idle").out.splitlines() == ["B='two words'", "C=3"]

        # commands need a running VM: error with the fix, exit 1
        r = smolvm(d, "run", "cli-idle", "--", "true")
        assert r.code == 1 and "not running" in one_line_error(r) and "smolvm start cli-idle" in r.err, str(r)
        r = smolvm(d, "logs", "cli-idle")
        assert r.code == 0 and r.out == "", str(r)
        r = smolvm(d, "ssh", "cli-idle", "--print")
        assert r.code == 0 and r.out.startswith("ssh ") and "root@127.0.0.1" in r.out, str(r)
        r = smolvm(d, "ssh", "cli-idle")
        assert r.code == 1 and "not running" in one_line_error(r), str(r)
        r = smolvm(d, "stop", "cli-idle")
        assert r.code == 0 and "was not running" in r.err, str(r)
    finally:
        r = smolvm(d, "delete", "cli-idle")
    assert r.code == 0, str(r)
    assert smolvm(d, "list", "--json").json() == []


def test_prune_deletes_stopped_and_asks_without_yes(tmp_path: Path, default_image) -> None:
    d = tmp_path / "data"
    for vm_id in ("p1", "p2"):
        assert smolvm(d, "create", "--id", vm_id).code == 0
    assert smolvm(d, "stop", "p1").code == 0  # created → stopped
    r = smolvm(d, "prune")  # stdin is not a terminal: refuse without --yes
    assert r.code == 2 and "--yes" in r.err, str(r)
    r = smolvm(d, "prune", "--yes")
    assert r.code == 0 and r.out.split() == ["p1"], str(r)
    assert [v["vm_id"] for v in smolvm(d, "list", "--json").json()] == ["p2"]
    assert smolvm(d, "delete", "p2").code == 0
    r = smolvm(d, "reconcile", "--json")
    assert r.code == 0 and r.json() == {"marked_error": []}, str(r)


def test_image_list_json(ddir: Path, default_image) -> None:
    r = smolvm(ddir, "image", "list", "--json")
    assert r.code == 0, str(r)
    imgs = {i["name"]: i for i in r.json()}
    assert "default" in imgs and imgs["default"]["agent"] is True
    assert Path(imgs["default"]["kernel"]).exists() and imgs["default"]["current"] is True
    r = smolvm(ddir, "image", "build")  # up to date: no rebuild, prints the path
    assert r.code == 0 and r.out.strip() == imgs["default"]["path"] and "up to date" in r.err, str(r)
    r = smolvm(ddir, "image", "rm", "no-such-image")
    assert r.code == 1 and "no image named" in one_line_error(r), str(r)


def test_audit_and_snapshots_empty(tmp_path: Path) -> None:
    r = smolvm(tmp_path, "audit", "--json")
    assert r.code == 0 and r.json() == [], str(r)
    r = smolvm(tmp_path, "snapshot", "list", "--json")
    assert r.code == 0 and r.json() == [], str(r)
    r = smolvm(tmp_path, "snapshot", "rm", "nope")
    assert r.code == 1 and "nope" in one_line_error(r), str(r)


def test_create_records_the_egress_policy(tmp_path: Path, default_image) -> None:
    d = tmp_path / "data"
    policy = ["--allow-domain", "pypi.org", "--allow-domain", "*.example.com", "--allow-cidr", "10.9.0.0/16"]
    r = smolvm(d, "create", "--id", "cli-egress", *policy, "--dns", "198.51.100.53")
    assert r.code == 0, str(r)
    net = smolvm(d, "info", "cli-egress", "--json").json()["config"]["internet_settings"]
    assert net == {
        "allowed_domains": ["pypi.org", "*.example.com"],
        "allowed_cidrs": ["10.9.0.0/16"],
        "dns_servers": ["198.51.100.53"],
    }
    assert "HTTP(S) to pypi.org, *.example.com + 10.9.0.0/16" in smolvm(d, "info", "cli-egress").out
    r = smolvm(d, "create", "--id", "cli-sealed", "--no-internet")
    assert r.code == 0, str(r)
    assert (
        smolvm(d, "info", "cli-sealed", "--json").json()["config"]["internet_settings"]["allowed_domains"]
        == []
    )
    for vm in ("cli-egress", "cli-sealed"):
        assert smolvm(d, "delete", vm).code == 0
