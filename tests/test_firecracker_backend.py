"""FirecrackerBackend against the Firecracker API conformance server.

No firecracker binary can run here (KVM is emulated), so the backend launches
``tests/firecracker_conformance`` as its ``firecracker`` executable. That server validates
every request against Firecracker's API (schema + state rules) and records it; the tests
check the exact request sequences and that every request was accepted. The last group of
tests proves the server itself rejects non-conforming requests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from firecracker_conformance import (
    HERE as CONFORMANCE_DIR,
)
from firecracker_conformance import (
    install_fake_firecracker,
    read_requests,
    record_path_for,
)
from firecracker_conformance.server import FakeFirecracker
from smolvm.backends.base import DiskSpec, LaunchSpec, NetSpec
from smolvm.backends.firecracker import (
    ENV_BIN,
    FirecrackerBackend,
    firecracker_instance_id,
    vsock_connect,
)
from smolvm.backends.firecracker_api import FirecrackerAPI
from smolvm.exceptions import BackendError, ImageError, NetworkError, SnapshotError
from smolvm.host.kvm import KVMProbe

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off init=/init smolvm.x=1"
USABLE = KVMProbe(True, True, "test: KVM assumed usable")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def short_dir():
    # UNIX socket paths must stay under 108 bytes; pytest's tmp_path can be long.
    d = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake_bin(short_dir, monkeypatch):
    exe = install_fake_firecracker(short_dir / "bin")
    monkeypatch.setenv(ENV_BIN, str(exe))
    for var in ("FAKE_FC_FAULTS", "FAKE_FC_VSOCK_PORTS", "FAKE_FC_SERIAL", "FAKE_FC_RECORD"):
        monkeypatch.delenv(var, raising=False)
    return exe


@pytest.fixture
def pids():
    started: list[int] = []
    yield started
    for pid in started:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def backend(fake_bin):
    return FirecrackerBackend(kvm_probe=lambda: USABLE, socket_wait=15)


def make_spec(d: Path, name: str = "vm", **kw) -> LaunchSpec:
    d.mkdir(parents=True, exist_ok=True)
    images = d.parent / "images"
    images.mkdir(exist_ok=True)
    (images / "vmlinux").write_bytes(b"\x7fELF fake kernel")
    (images / "stage1.cpio").write_bytes(b"070701 fake initrd")
    root = d / "root.img"
    root.write_bytes(b"\0" * 4096)
    cfg = d / "config.tar"
    cfg.write_bytes(b"\0" * 1024)
    args = dict(
        vm_id=name,
        vm_dir=d,
        kernel=images / "vmlinux",
        initrd=images / "stage1.cpio",
        disks=[DiskSpec(root, "raw", False, "d0"), DiskSpec(cfg, "raw", True, "cfg")],
        boot_args=BOOT_ARGS,
        vcpus=2,
        mem_mib=256,
        serial_log=d / "serial.log",
        agent_socket=d / "agent.sock",
        control_socket=d / "api.sock",
        process_log=d / "process.log",
    )
    args.update(kw)
    return LaunchSpec(**args)


def reqs(spec: LaunchSpec) -> list[dict]:
    """Requests the VMM received, without the GETs the tests make themselves."""
    return [r for r in read_requests(record_path_for(spec.control_socket)) if r["method"] != "GET"]


def calls(spec: LaunchSpec) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in reqs(spec)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists": check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def instance_state(spec: LaunchSpec) -> str:
    return FirecrackerAPI(spec.control_socket).get("/")["state"]


# -- boot -------------------------------------------------------------------------------


def test_launch_boot_sequence(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    pid = backend.launch(spec)
    pids.append(pid)
    assert alive(pid)
    assert calls(spec) == [
        ("PUT", "/logger"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/d0"),
        ("PUT", "/drives/cfg"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
    ]
    recorded = reqs(spec)
    assert all(r["status"] == 204 for r in recorded), recorded
    body = {r["path"]: r["body"] for r in recorded}
    assert body["/logger"]["log_path"] == str(spec.vm_dir / "firecracker.log")
    assert body["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256}
    assert body["/boot-source"] == {
        "kernel_image_path": str(spec.kernel),
        "initrd_path": str(spec.initrd),
        "boot_args": BOOT_ARGS,  # passed through untouched
    }
    assert body["/drives/d0"] == {"drive_id": "d0", "path_on_host": str(spec.disks[0].path),
                                  "is_root_device": False, "is_read_only": False}  # fmt: skip
    assert body["/drives/cfg"]["is_read_only"] is True
    assert body["/vsock"] == {"guest_cid": 3, "uds_path": str(spec.agent_socket)}
    assert body["/actions"] == {"action_type": "InstanceStart"}
    assert instance_state(spec) == "Running"
    # Firecracker's stdout is the guest serial console -> serial_log
    serial = spec.serial_log.read_text()
    assert f"Command line: {BOOT_ARGS}" in serial
    # after PUT /logger the VMM logs to its own file, not the console
    assert "received a PUT request" in (spec.vm_dir / "firecracker.log").read_text()
    assert spec.agent_socket.exists()  # vsock UDS bound by the VMM


def test_launch_with_tap_network(backend, short_dir, pids):
    net = NetSpec(mode="tap", mac="06:00:ac:10:00:02", tap_device="smoltap0")
    spec = make_spec(short_dir / "vm1", net=net)
    pids.append(backend.launch(spec))
    c = calls(spec)
    assert ("PUT", "/network-interfaces/eth0") in c
    assert c.index(("PUT", "/network-interfaces/eth0")) < c.index(("PUT", "/actions"))
    body = next(r["body"] for r in reqs(spec) if r["path"] == "/network-interfaces/eth0")
    assert body == {"iface_id": "eth0", "guest_mac": "06:00:ac:10:00:02", "host_dev_name": "smoltap0"}
    assert all(r["status"] == 204 for r in reqs(spec))


def test_user_networking_is_refused_before_starting(backend, short_dir):
    spec = make_spec(short_dir / "vm1", net=NetSpec(mode="user", mac="06:00:00:00:00:01"))
    with pytest.raises(NetworkError) as ei:
        backend.launch(spec)
    assert "no user-mode networking" in str(ei.value) and "network='tap'" in str(ei.value)
    assert not spec.control_socket.exists()


def test_qcow2_disk_is_refused(backend, short_dir):
    spec = make_spec(short_dir / "vm1")
    spec.disks[0].format = "qcow2"
    with pytest.raises(BackendError, match="raw images only"):
        backend.launch(spec)


def test_missing_kernel_is_an_image_error(backend, short_dir):
    spec = make_spec(short_dir / "vm1")
    spec.kernel = short_dir / "no-such-vmlinux"
    with pytest.raises(ImageError, match="kernel"):
        backend.launch(spec)
    assert not spec.control_socket.exists()


def test_vm_id_is_mapped_to_a_valid_instance_id(backend, short_dir, pids):
    assert firecracker_instance_id("my_vm_1") == "my-vm-1"
    spec = make_spec(short_dir / "vm1", name="my_vm_1")  # the fake rejects '_' like Firecracker
    pids.append(backend.launch(spec))
    assert FirecrackerAPI(spec.control_socket).get("/")["id"] == "my-vm-1"


def test_disk_ids_are_mapped_to_api_ids(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    spec.disks[1].id = "config-disk"
    pids.append(backend.launch(spec))
    assert ("PUT", "/drives/config_disk") in calls(spec)


def test_stale_sockets_are_replaced(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    for p in (spec.control_socket, spec.agent_socket):  # leftovers of a dead VM
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    pids.append(backend.launch(spec))
    assert instance_state(spec) == "Running"


def test_socket_in_use_is_an_error(backend, short_dir):
    spec = make_spec(short_dir / "vm1")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(spec.agent_socket))
    s.listen(1)
    try:
        with pytest.raises(BackendError, match="in use"):
            backend.launch(spec)
    finally:
        s.close()


def test_long_socket_path_is_an_error(backend, short_dir):
    spec = make_spec(short_dir / "vm1", control_socket=short_dir / ("x" * 120) / "api.sock")
    with pytest.raises(BackendError, match="too long"):
        backend.launch(spec)


def test_binary_found_on_path(short_dir, monkeypatch, pids):
    monkeypatch.delenv(ENV_BIN, raising=False)
    monkeypatch.setenv("PATH", f"{CONFORMANCE_DIR}{os.pathsep}{os.environ['PATH']}")
    b = FirecrackerBackend(kvm_probe=lambda: USABLE, socket_wait=15)
    assert b.find_binary() == str(CONFORMANCE_DIR / "firecracker")
    assert b.check_prerequisites() == []
    spec = make_spec(short_dir / "vm1")
    pids.append(b.launch(spec))
    assert instance_state(spec) == "Running"


def test_process_that_dies_at_once(short_dir, monkeypatch):
    bad = short_dir / "bin" / "firecracker"
    bad.parent.mkdir()
    bad.write_text("#!/bin/sh\necho 'error: KVM not available' >&2\nexit 3\n")
    bad.chmod(0o755)
    monkeypatch.setenv(ENV_BIN, str(bad))
    spec = make_spec(short_dir / "vm1")
    with pytest.raises(BackendError) as ei:
        FirecrackerBackend(kvm_probe=lambda: USABLE).launch(spec)
    assert "exited with code 3" in str(ei.value)
    assert "KVM not available" in str(ei.value)


# -- control ----------------------------------------------------------------------------


def test_pause_resume(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    pids.append(backend.launch(spec))
    backend.pause(spec)
    assert instance_state(spec) == "Paused"
    backend.resume(spec)
    assert instance_state(spec) == "Running"
    tail = reqs(spec)[-4:]
    assert [(r["method"], r["path"], r["body"]) for r in tail if r["method"] == "PATCH"] == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]


def test_request_shutdown_sends_ctrl_alt_del(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    pid = backend.launch(spec)
    pids.append(pid)
    backend.request_shutdown(spec)
    assert reqs(spec)[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert reqs(spec)[-1]["status"] == 204
    assert wait_dead(pid), "the VMM should exit when the guest reboots (reboot=k)"
    assert "reboot: Restarting system" in spec.serial_log.read_text()


def test_request_shutdown_warns_when_the_guest_has_no_keyboard(backend, short_dir, pids, caplog):
    spec = make_spec(short_dir / "vm1", boot_args=BOOT_ARGS + " i8042.nokbd")
    pid = backend.launch(spec)
    pids.append(pid)
    with caplog.at_level("WARNING", logger="smolvm.backends.firecracker"):
        backend.request_shutdown(spec)
    assert "i8042.nokbd" in caplog.text
    time.sleep(0.3)
    assert alive(pid)  # Ctrl-Alt-Del was lost, as in a real guest


def test_vsock_connect_handshake(backend, short_dir, pids, monkeypatch):
    monkeypatch.setenv("FAKE_FC_VSOCK_PORTS", "52")
    spec = make_spec(short_dir / "vm1")
    pids.append(backend.launch(spec))
    s = vsock_connect(spec.agent_socket, 52, timeout=5)
    with s:
        s.sendall(b"ping")
        assert s.recv(16) == b"ping"
    with pytest.raises(BackendError, match="not accepting vsock connections on port 53"):
        vsock_connect(spec.agent_socket, 53, timeout=5)


# -- error mapping ----------------------------------------------------------------------


def test_api_fault_becomes_backend_error(backend, short_dir, monkeypatch):
    fault = "Boot source error: The kernel file cannot be opened: Permission denied (os error 13)"
    monkeypatch.setenv("FAKE_FC_FAULTS", json.dumps({"PUT /boot-source": fault}))
    spec = make_spec(short_dir / "vm1")
    with pytest.raises(BackendError) as ei:
        backend.launch(spec)
    err = ei.value
    assert fault in str(err)
    assert err.details["fault_message"] == fault
    assert err.details["status"] == 400
    assert err.details["path"] == "/boot-source"
    # the half-configured VMM was killed
    with pytest.raises(BackendError, match="cannot talk to"):
        FirecrackerAPI(spec.control_socket, timeout=0.5).get("/")


def test_runtime_fault_becomes_backend_error(backend, short_dir, pids):
    spec = make_spec(short_dir / "vm1")
    pids.append(backend.launch(spec))
    api = FirecrackerAPI(spec.control_socket)
    with pytest.raises(BackendError, match="not supported after starting the microVM"):
        api.put("/boot-source", {"kernel_image_path": str(spec.kernel)})


def test_unreachable_socket_is_a_backend_error(short_dir):
    spec = make_spec(short_dir / "vm1")
    with pytest.raises(BackendError, match="cannot talk to"):
        FirecrackerBackend(kvm_probe=lambda: USABLE).pause(spec)


# -- prerequisites ------------------------------------------------------------------------


def test_prerequisites_ok_with_binary_and_kvm(backend):
    assert backend.check_prerequisites() == []


def test_prerequisites_missing_binary(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_BIN, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    problems = FirecrackerBackend(kvm_probe=lambda: USABLE).check_prerequisites()
    assert len(problems) == 1
    assert "firecracker binary not found" in problems[0] and ENV_BIN in problems[0]


def test_prerequisites_bad_env_binary(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_BIN, str(tmp_path / "nope"))
    problems = FirecrackerBackend(kvm_probe=lambda: USABLE).check_prerequisites()
    assert any("does not exist or is not executable" in p for p in problems)


def test_prerequisites_report_unusable_kvm(fake_bin):
    slow = KVMProbe(False, True, "/dev/kvm exists but ... virtualization is emulated; using TCG")
    problems = FirecrackerBackend(kvm_probe=lambda: slow).check_prerequisites()
    assert len(problems) == 1
    assert "emulated" in problems[0] and "backend='qemu'" in problems[0]
    missing = KVMProbe(False, False, "/dev/kvm missing: no KVM; using TCG")
    problems = FirecrackerBackend(kvm_probe=lambda: missing).check_prerequisites()
    assert "/dev/kvm missing" in problems[0]


def test_prerequisites_use_the_real_probe(fake_bin, tmp_path, monkeypatch):
    """On this host (emulated nested KVM) the real probe must make Firecracker unavailable."""
    monkeypatch.delenv("SMOLVM_ACCEL", raising=False)
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    b = FirecrackerBackend(cache_dir=tmp_path)
    probe = b.probe()
    problems = b.check_prerequisites()
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" not in flags and " svm" not in flags:
        # No hardware virtualization (this machine kind): the probe must say so.
        assert not probe.usable and len(problems) == 1 and "KVM" in problems[0], (probe, problems)
    else:
        assert (problems == []) == probe.usable, (probe, problems)


# -- the conformance server rejects what Firecracker rejects ------------------------------

K = "/tmp/does-not-matter"
NEG = [
    # (method, path, body, fault substring)
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "foo": 1}, "unknown field `foo`"),
    ("PUT", "/machine-config", {"vcpu_count": 1}, "missing field `mem_size_mib`"),
    ("PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 128}, "invalid type"),
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "invalid value"),
    ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, "invalid value"),
    ("PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 128}, "invalid type"),
    ("PUT", "/boot-source", {"kernel": K}, "unknown field `kernel`"),
    ("PUT", "/boot-source", {"boot_args": "x"}, "missing field `kernel_image_path`"),
    ("PUT", "/boot-source", {"kernel_image_path": "/nonexistent/vmlinux"}, "kernel file cannot be opened"),
    ("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": K, "is_read_only": False}, "missing field `is_root_device`"),
    ("PUT", "/drives/d0", {"drive_id": "d1", "path_on_host": K, "is_root_device": False, "is_read_only": False}, "does not match"),
    ("PUT", "/drives/d-0", {"drive_id": "d-0", "path_on_host": K, "is_root_device": False, "is_read_only": False}, "alphanumeric"),
    ("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": K, "is_root_device": False, "is_read_only": "no"}, "invalid type"),
    ("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": K, "is_root_device": False}, "missing field `is_read_only`"),
    ("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": "/nonexistent", "is_root_device": False, "is_read_only": True}, "backing file"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz:00:00:00:00:01"}, "invalid value"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "guest_mac": "06:00:00:00:00:01"}, "missing field `host_dev_name`"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"}, "does not match"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0", "mode": "user"}, "unknown field `mode`"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/tmp/x"}, "invalid value"),
    ("PUT", "/vsock", {"guest_cid": 3}, "missing field `uds_path`"),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/x", "port": 52}, "unknown field `port`"),
    ("PUT", "/actions", {"action_type": "Start"}, "unknown variant `Start`"),
    ("PUT", "/actions", {}, "missing field `action_type`"),
    ("PATCH", "/vm", {"state": "Running"}, "unknown variant `Running`"),
    ("PUT", "/snapshot/create", {"snapshot_path": "/tmp/s"}, "missing field `mem_file_path`"),
    ("PUT", "/snapshot/create", {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m", "snapshot_type": "Partial"}, "unknown variant"),
    ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s"}, "either `mem_backend` or `mem_file_path`"),
    ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}, "too many fields"),
    ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s", "mem_backend": {"backend_type": "Memory", "backend_path": "/m"}}, "unknown variant `Memory`"),
    ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/s", "mem_backend": {"backend_path": "/m"}}, "missing field `backend_type`"),
    ("PUT", "/logger", {"level": "Loud"}, "unknown variant `Loud`"),
    ("PUT", "/machine", {"vcpu_count": 1}, "Invalid request method and/or path"),
    ("DELETE", "/vm", None, "Invalid request method and/or path"),
]  # fmt: skip


@pytest.fixture
def fake(short_dir):
    Path(K).touch()
    serial = open(short_dir / "serial.log", "wb")
    f = FakeFirecracker(short_dir / "api.sock", "t", serial=serial)
    yield f
    f.close()
    serial.close()


@pytest.mark.parametrize(
    "method,path,body,fault", NEG, ids=[f"{m} {p} {i}" for i, (m, p, _, _) in enumerate(NEG)]
)
def test_server_rejects_nonconforming_requests(fake, method, path, body, fault):
    raw = json.dumps(body).encode() if body is not None else b""
    status, answer = fake.handle(method, path, raw)
    assert status == 400
    assert fault in answer["fault_message"]
    assert fake.requests[-1]["status"] == 400  # recorded as a failure


def test_server_rejects_bad_json_and_empty_bodies(fake):
    status, answer = fake.handle("PUT", "/machine-config", b"{vcpu_count: 1}")
    assert status == 400 and "deserializing the json body" in answer["fault_message"]
    status, answer = fake.handle("PUT", "/machine-config", b"")
    assert status == 400 and answer["fault_message"] == "Empty PUT request."


def _ok(fake, method, path, body=None):
    status, answer = fake.handle(method, path, json.dumps(body).encode() if body is not None else b"")
    assert status in (200, 204), answer
    return answer


def _err(fake, method, path, body=None):
    status, answer = fake.handle(method, path, json.dumps(body).encode() if body is not None else b"")
    assert status == 400, (method, path, body)
    return answer["fault_message"]


def test_server_state_rules(fake, short_dir):
    kernel = short_dir / "vmlinux"
    kernel.write_bytes(b"k")
    assert "before starting" in _err(fake, "PATCH", "/vm", {"state": "Paused"})
    assert "before starting" in _err(fake, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert "before starting" in _err(
        fake, "PUT", "/snapshot/create", {"snapshot_path": "/tmp/a", "mem_file_path": "/tmp/b"}
    )
    assert "without kernel configuration" in _err(fake, "PUT", "/actions", {"action_type": "InstanceStart"})
    _ok(fake, "PUT", "/logger", {"level": "info"})  # logger does not block a later load
    _ok(fake, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert "not allowed after configuring" in _err(
        fake, "PUT", "/snapshot/load",
        {"snapshot_path": "/tmp/a", "mem_backend": {"backend_type": "File", "backend_path": "/tmp/b"}},
    )  # fmt: skip
    _ok(fake, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    _ok(fake, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert _ok(fake, "GET", "/")["state"] == "Running"
    assert "after starting" in _err(fake, "PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    assert "after starting" in _err(fake, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert "after starting" in _err(fake, "PUT", "/actions", {"action_type": "InstanceStart"})
    snap = {"snapshot_path": str(short_dir / "s"), "mem_file_path": str(short_dir / "m")}
    assert "must be paused" in _err(fake, "PUT", "/snapshot/create", snap)
    _ok(fake, "PATCH", "/vm", {"state": "Paused"})
    assert "dirty page tracking" in _err(fake, "PUT", "/snapshot/create", dict(snap, snapshot_type="Diff"))
    _ok(fake, "PUT", "/snapshot/create", snap)
    _ok(fake, "PATCH", "/vm", {"state": "Resumed"})
    assert _ok(fake, "GET", "/")["state"] == "Running"


def test_server_rejects_over_http(fake, short_dir):
    """The same rules hold on the wire (HTTP over the UNIX socket), via the backend's client."""
    fake.serve_in_thread()
    api = FirecrackerAPI(short_dir / "api.sock")
    with pytest.raises(BackendError) as ei:
        api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "smt": "yes"})
    assert ei.value.details["status"] == 400
    assert "invalid type" in ei.value.details["fault_message"]
    assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}) is None
    assert api.get("/machine-config")["mem_size_mib"] == 128


def test_snapshots_are_refused_by_the_contract(backend, short_dir):
    """Firecracker declares no snapshot support; the contract's calls say so, typed."""
    assert backend.supports_snapshots is False and backend.disk_format == "raw"
    spec = make_spec(short_dir / "vm1")
    with pytest.raises(SnapshotError, match="cannot snapshot"):
        backend.save_state(spec, short_dir / "state")
    with pytest.raises(SnapshotError, match="does not restore"):
        backend.launch(make_spec(short_dir / "vm2", incoming=short_dir / "state"))
