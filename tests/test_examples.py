"""Every example script runs as written against a real guest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, data_dir: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOLVM_DATA_DIR": str(data_dir), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=env, timeout=300
    )


def no_vms_left(data_dir: Path) -> bool:
    from smolvm import SmolVMManager

    with SmolVMManager(data_dir=data_dir) as m:
        return m.list_vms() == []


def test_quickstart(tmp_path, default_image):
    p = run_example("quickstart.py", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "Hello from SmolVM"
    assert "Linux" in p.stdout
    assert no_vms_left(tmp_path)


def test_callbacks_safety_and_audit(tmp_path, default_image):
    p = run_example("callbacks_safety_and_audit.py", tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].endswith("'echo hello' -> exit=0")
    assert lines[1] == "refused: rm -rf /"
    assert no_vms_left(tmp_path)


def test_block_unsafe_raises_as_documented(tmp_path, default_image):
    p = run_example("block_unsafe.py", tmp_path)
    assert p.returncode == 1
    assert "smolvm.exceptions.CommandBlockedError: Blocked unsafe command: 'rm -rf /'" in p.stderr
    assert no_vms_left(tmp_path)  # the context manager still cleaned up


def test_log_every_command(tmp_path, default_image):
    p = run_example("log_every_command.py", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "'uname -r' -> exit=0" in p.stdout


def test_attach_callback(tmp_path, default_image):
    p = run_example("attach_callback.py", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["about to run: echo hi"]
    assert no_vms_left(tmp_path)


def test_builtin_guards(tmp_path, default_image):
    p = run_example("guards_builtin.py", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("blocked:") == 2
    assert "blocked echo ok && dd if=/dev/zero of=/dev/vda" in p.stdout


def test_prompt_injection_guard_with_local_model(tmp_path, default_image, injection_model_dir):
    p = run_example(
        "prompt_injection_guard.py",
        tmp_path,
        {"SMOLVM_INJECTION_MODEL": str(injection_model_dir), "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert "Prompt injection detected (malicious" in p.stdout
    assert no_vms_left(tmp_path)


def test_mcp_client(tmp_path, default_image):
    bin_dir = str(Path(sys.executable).parent)  # `smolvm` next to this interpreter
    p = run_example("mcp_client.py", tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("tools: create_sandbox, delete_sandbox")
    assert lines[1:] == ["uname: Linux", "rm -rf / refused: True"]
    assert no_vms_left(tmp_path)


def test_async_agent(tmp_path, default_image):
    p = run_example("async_agent.py", tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert sorted(lines[:-1]) == ["box1-1", "box1-2", "box2-1", "box2-2"]
    assert lines[-1] == "results: ['1', '2']"
    assert no_vms_left(tmp_path)


def test_files_api_example(tmp_path, default_image):
    p = run_example("files_api.py", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "notes.txt file 6 0o644",
        "hello",
        "exists after remove: False",
        "changes seen: True True",
        "terminal says 42",
    ]
    assert no_vms_left(tmp_path)


def test_fleet_rollouts(tmp_path, default_image):
    # Fleet() starts a local one-node Ray cluster; bound to 127.0.0.1 for the test.
    p = run_example("fleet_rollouts.py", tmp_path, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "rollouts: 24 all ok: True" and lines[2] == "nodes: 1"
    import random

    want = []
    for seed in range(3):
        random.seed(seed)
        want.append(str(random.randint(0, 99)))
    assert lines[1] == f"first three: {want}"  # results in input order
    assert no_vms_left(tmp_path)
