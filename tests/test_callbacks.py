"""Seed 000/001 callback semantics against real guests, identical over agent and SSH."""

from __future__ import annotations

import logging

import pytest

from smolvm import Callback, CommandBlockedError, RunContext, SmolVM, SmolVMError
from smolvm.exceptions import OperationTimeoutError
from smolvm.guards import AuditLog, SafetyGuard

pytestmark = pytest.mark.e2e


class Recorder(Callback):
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def on_pre_run(self, ctx):
        self.log.append((self.name, "pre", ctx.command, ctx.result, ctx.error))

    def on_post_run(self, ctx):
        self.log.append((self.name, "post", ctx.command, ctx.result.exit_code, ctx.error))

    def on_run_error(self, ctx):
        self.log.append((self.name, "error", ctx.command, ctx.result, type(ctx.error).__name__))


class Deny(Callback):
    def on_pre_run(self, ctx):
        if "forbidden-marker" in ctx.command:
            raise CommandBlockedError(f"no: {ctx.command}", vm_id=ctx.vm_id, command=ctx.command)


class Broken(Callback):
    def on_post_run(self, ctx):
        raise RuntimeError("buggy observer")

    def on_run_error(self, ctx):
        raise RuntimeError("buggy error observer")


@pytest.fixture(scope="module")
def boxes(tmp_path_factory, default_image):
    d = tmp_path_factory.mktemp("cb")
    out = {}
    try:
        for ch in ("agent", "ssh"):
            out[ch] = SmolVM(data_dir=d, comm_channel=ch).start()
        yield out
    finally:
        for vm in out.values():
            vm.__exit__(None, None, None)


@pytest.fixture(params=["agent", "ssh"])
def vm(request, boxes):
    v = boxes[request.param]
    v._callbacks.clear()
    return v


def test_block_never_reaches_guest_and_connection_is_reused(vm):
    vm.add_callback(Deny())
    vm.run("echo warmup")
    channel_before = vm._transport
    connects_before = channel_before.connects
    assert connects_before >= 1
    with pytest.raises(CommandBlockedError) as ei:
        vm.run("touch /root/forbidden-marker")
    err = ei.value
    assert isinstance(err, SmolVMError)
    assert err.vm_id == vm.vm_id and err.command == "touch /root/forbidden-marker"
    assert err.details == {"vm_id": vm.vm_id, "command": "touch /root/forbidden-marker"}
    assert err.message.startswith("no:")
    assert vm.run("ls /root/ | grep -c forbid || true").output == "0"
    assert vm._transport is channel_before
    assert vm._transport.connects == connects_before  # no reconnect: the same connection


def test_hooks_order_and_context(vm):
    log: list = []
    vm.add_callback(Recorder("a", log)).add_callback(Recorder("b", log))
    r = vm.run("echo hi", timeout=7, shell="raw")
    assert r.output == "hi"
    assert log == [
        ("a", "pre", "echo hi", None, None),
        ("b", "pre", "echo hi", None, None),
        ("a", "post", "echo hi", 0, None),
        ("b", "post", "echo hi", 0, None),
    ]


def test_context_fields(vm):
    seen: list[RunContext] = []

    class Grab(Callback):
        def on_pre_run(self, ctx):
            seen.append(ctx)

    vm.add_callback(Grab())
    vm.run("exit 3", timeout=9, shell="login")
    ctx = seen[0]
    assert (ctx.vm_id, ctx.command, ctx.shell, ctx.timeout) == (vm.vm_id, "exit 3", "login", 9)
    assert ctx.result is not None and ctx.result.exit_code == 3 and ctx.error is None
    assert (ctx.env, ctx.cwd, ctx.stdin) == (None, None, None)
    # Guards see the whole request: environment, working directory and stdin too.
    vm.run("cat", env={"K": "v"}, cwd="/tmp", stdin=b"rm -rf /")
    ctx = seen[1]
    assert (ctx.env, ctx.cwd, ctx.stdin) == ({"K": "v"}, "/tmp", b"rm -rf /")
    vm.spawn("true", env={"S": "1"}, cwd="/").wait(30)
    assert (seen[2].env, seen[2].cwd, seen[2].timeout) == ({"S": "1"}, "/", 0)


def test_post_run_exceptions_are_logged_and_swallowed(vm, caplog):
    log: list = []
    vm.add_callback(Broken()).add_callback(Recorder("after", log))
    with caplog.at_level(logging.ERROR, logger="smolvm.callbacks"):
        assert vm.run("echo fine").output == "fine"
    assert "buggy observer" in caplog.text
    assert ("after", "post", "echo fine", 0, None) in log  # later observers still run


def test_run_error_hook_sees_transport_error_which_still_propagates(vm, caplog):
    log: list = []
    vm.add_callback(Broken()).add_callback(Recorder("r", log))
    with caplog.at_level(logging.ERROR, logger="smolvm.callbacks"):
        with pytest.raises(OperationTimeoutError):
            vm.run("sleep 30", timeout=1)
    assert ("r", "error", "sleep 30", None, "OperationTimeoutError") in log
    assert "buggy error observer" in caplog.text
    assert vm.run("echo ok").output == "ok"


def test_any_pre_run_exception_vetoes(vm):
    class Boom(Callback):
        def on_pre_run(self, ctx):
            raise ValueError("policy engine down")

    vm.add_callback(Boom())
    with pytest.raises(ValueError, match="policy engine down"):
        vm.run("touch /root/never")
    vm._callbacks.clear()
    assert vm.run("test -e /root/never; echo $?").output == "1"


def test_add_callback_validation(vm):
    assert vm.add_callback(Callback()) is vm
    with pytest.raises(TypeError):
        vm.add_callback(lambda ctx: None)
    with pytest.raises(TypeError):
        SmolVM.__new__(SmolVM).add_callback("nope")  # type: ignore[arg-type]


def test_safety_guard_and_audit_log_end_to_end(vm, tmp_path):
    audit = AuditLog(tmp_path / "audit.db")
    vm.add_callback(SafetyGuard()).add_callback(audit)
    assert vm.run('echo "rm -rf /"').output == "rm -rf /"
    assert vm.run("rm -rf ./build && echo cleaned").output == "cleaned"
    for bad in (
        "rm -fr /",
        "bash -c 'rm -r -f /*'",
        "echo ok && mkfs.ext4 /dev/vda",
        "x=$(dd if=/dev/zero of=/dev/vda bs=1M count=1)",
        "bomb(){ bomb|bomb& };bomb",
    ):
        with pytest.raises(CommandBlockedError):
            vm.run(bad)
    assert vm.run("ls /bin >/dev/null && echo intact").output == "intact"
    vm.run("exit 4")
    with pytest.raises(OperationTimeoutError):
        vm.run("sleep 20", timeout=1)
    recs = audit.query(vm_id=vm.vm_id, limit=100)
    by_status: dict[str, list] = {}
    for r in recs:
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status["blocked"]) == 5
    assert all(r.blocked_by for r in by_status["blocked"])
    assert {r.exit_code for r in by_status["failed"]} == {4}
    assert len(by_status["error"]) == 1 and "timed out" in by_status["error"][0].error
    ok = [r for r in by_status["ok"] if r.command == 'echo "rm -rf /"'][0]
    assert ok.stdout_bytes == len("rm -rf /\n") and ok.shell == "login"
    audit.close()
