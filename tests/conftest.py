"""Shared fixtures. Like Firecracker's test framework, every VM a test starts is recorded
and killed at teardown, and the session fails loudly if any QEMU process leaks."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# One image build per machine, shared by every test's private data dir.
IMAGE_DIR = Path(os.environ.get("SMOLVM_TEST_IMAGE_DIR", Path.home() / ".cache" / "smolvm-test" / "images"))
os.environ["SMOLVM_IMAGE_DIR"] = str(IMAGE_DIR)
IMAGE_DIR.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ host preconditions
#: CI (CI=true, set by .ci/run) must run everything: a missing precondition fails there
#: instead of skipping, so a misconfigured runner cannot hide whole areas.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing_host_packages() -> list[str]:
    from smolvm.cli.setup import missing_packages

    return missing_packages()


PRECONDITIONS: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0, "needs root (TAP, nftables, apt-get)"),
    "busybox": (lambda: Path("/bin/busybox").exists(), "needs /bin/busybox (busybox-static)"),
    "qemu": (lambda: shutil.which("qemu-system-x86_64") is not None, "needs qemu-system-x86_64"),
    "unshare": (
        lambda: subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode == 0,
        "needs `unshare -u` (a UTS namespace)",
    ),
    "host-packages": (lambda: not _missing_host_packages(), "needs every package scripts/setup.sh installs"),
}


@functools.cache
def _precondition_ok(name: str) -> bool:
    return PRECONDITIONS[name][0]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        for name in mark.args:
            if name not in PRECONDITIONS:
                pytest.fail(f"unknown precondition {name!r}; known: {sorted(PRECONDITIONS)}", pytrace=False)
            if not _precondition_ok(name):
                reason = PRECONDITIONS[name][1]
                if IN_CI:
                    pytest.fail(f"precondition missing in CI (CI=true): {reason}", pytrace=False)
                pytest.skip(reason)


def qemu_pids_for(vm_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"-name smolvm-{vm_id} "], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(scope="session")
def default_image():
    """The default image, built once (first run on a machine: ~1 min)."""
    from smolvm.images import ImageBuilder

    return ImageBuilder(IMAGE_DIR).ensure_default()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("SMOLVM_DATA_DIR", str(d))
    return d


class VMTracker:
    """Records every VM id created through it; ``cleanup`` kills and deletes them all."""

    def __init__(self, data_dir: Path) -> None:
        from smolvm import SmolVMManager

        self.data_dir = data_dir
        self.manager = SmolVMManager(data_dir=data_dir)
        self.vm_ids: list[str] = []
        self.sandboxes: list = []

    def sandbox(self, *args, **kwargs):
        from smolvm import SmolVM

        kwargs.setdefault("data_dir", self.data_dir)
        vm = SmolVM(*args, **kwargs)
        self.vm_ids.append(vm.vm_id)
        self.sandboxes.append(vm)
        return vm

    def track(self, vm_id: str) -> str:
        self.vm_ids.append(vm_id)
        return vm_id

    def cleanup(self) -> list[int]:
        from smolvm.exceptions import VMNotFoundError

        for vm in self.sandboxes:
            try:
                vm.close()
            except Exception:
                pass
        for vm_id in self.vm_ids:
            try:
                self.manager.delete(vm_id)
            except VMNotFoundError:
                pass
        leaked = [p for vm_id in self.vm_ids for p in qemu_pids_for(vm_id)]
        for p in leaked:
            os.kill(p, 9)
        self.manager.close()
        return leaked


@pytest.fixture
def vms(data_dir: Path, default_image) -> Iterator[VMTracker]:
    """Factory of sandboxes/VMs in a private data dir; everything is killed at teardown."""
    tracker = VMTracker(data_dir)
    yield tracker
    leaked = tracker.cleanup()
    assert not leaked, f"QEMU processes leaked by the test: {leaked}"


@pytest.fixture(scope="module")
def shared_vm(tmp_path_factory: pytest.TempPathFactory, default_image):
    """One running sandbox reused by a module's read-mostly tests."""
    from smolvm import SmolVM

    d = tmp_path_factory.mktemp("shared")
    vm = SmolVM(data_dir=d)
    try:
        vm.start()
        yield vm
    finally:
        vm_id, sock_dir = vm.vm_id, vm.manager.socket_dir
        try:
            vm.__exit__(None, None, None)
        finally:
            leaked = qemu_pids_for(vm_id)
            for p in leaked:
                os.kill(p, 9)
        assert leaked == [], f"QEMU of shared VM {vm_id} survived teardown"
        assert not list(sock_dir.glob(f"smolvm-{vm_id}.*")), "sockets/lock files left behind"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = subprocess.run(["pgrep", "-af", "qemu-system-x86_64 -name smolvm-"], capture_output=True, text=True)
    base = str(session.config._tmp_path_factory.getbasetemp())  # this session's VMs only
    leaked = [line for line in out.stdout.splitlines() if base in line]
    if leaked:
        print("\nFAIL: QEMU processes of test VMs still running:\n" + "\n".join(leaked))
        session.exitstatus = 1


@pytest.fixture(scope="session")
def injection_model_dir(request: pytest.FixtureRequest) -> Path:
    """A real text classifier trained locally (no model hub), cached across runs."""
    import importlib.util

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    script = Path(__file__).parent / "models" / "train_injection_model.py"
    spec = importlib.util.spec_from_file_location("train_injection_model", script)
    assert spec is not None and spec.loader is not None
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    root = os.environ.get("SMOLVM_TEST_MODEL_CACHE")
    if root:
        cache_root = Path(root)
    elif getattr(request.config, "cache", None) is not None:
        cache_root = Path(request.config.cache.mkdir("smolvm-models"))
    else:  # -p no:cacheprovider
        cache_root = Path(tempfile.gettempdir()) / "smolvm-test-models"
    return trainer.build_model(cache_root)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The reliability suite's figures, one JSON line (see tests/test_reliability.py)."""
    import json
    import sys

    mod = sys.modules.get("test_reliability")
    if mod is not None and mod.FIGURES:
        terminalreporter.write_line("RELIABILITY " + json.dumps(mod.FIGURES, sort_keys=True))
