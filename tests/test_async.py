"""AsyncSmolVM on a real guest: the same core and callbacks, awaited."""

from __future__ import annotations

import asyncio

import pytest

from smolvm import AsyncSmolVM, Callback, RunContext

pytestmark = pytest.mark.e2e


class Seen(Callback):
    def __init__(self) -> None:
        self.pre: list[str] = []
        self.post: list[str] = []

    def on_pre_run(self, ctx: RunContext) -> None:
        self.pre.append(ctx.command)

    def on_post_run(self, ctx: RunContext) -> None:
        self.post.append(ctx.command)


def test_async_run_stream_spawn_files_and_callbacks(data_dir, default_image) -> None:
    seen = Seen()

    async def main() -> dict:
        async with AsyncSmolVM(callbacks=[seen]) as vm:
            # Two commands at once from one event loop.
            a, b = await asyncio.gather(vm.run("sleep 0.3; echo a"), vm.run("echo b"))
            events = [ev async for ev in vm.stream("for i in 1 2 3; do echo $i; sleep 0.1; done; echo e >&2")]
            h = await vm.spawn("sleep 0.2; echo spawned")
            running = h.is_running()
            done = await h.wait(timeout=30)
            await vm.files.write("/root/async.txt", "via asyncio")
            text = await vm.files.read_text("/root/async.txt")
            async with await vm.files.watch("/root") as w:
                await vm.run("touch /root/watched")
                first = await w.get(5)
            term = await vm.pty("read line; echo got-$line", cols=50, rows=5)
            await term.write("xyz\n")
            typed = await term.read_until("got-xyz", timeout=30)
            term_exit = (await term.wait(30)).exit_code
            snap = await vm.snapshot()
            return {
                "a": a.output,
                "b": b.output,
                "events": events,
                "running": running,
                "done": done.output,
                "text": text,
                "first": first,
                "typed": typed,
                "term_exit": term_exit,
                "snap": snap.snapshot_id,
                "vm_id": vm.vm_id,
            }

    out = asyncio.run(main())
    assert (out["a"], out["b"]) == ("a", "b")
    stdout = b"".join(e.data for e in out["events"] if e.kind == "stdout")
    assert stdout == b"1\n2\n3\n" and [e.kind for e in out["events"]][-1] == "exit"
    assert out["events"][-1].result.exit_code == 0
    assert any(e.kind == "stderr" and e.data == b"e\n" for e in out["events"])
    assert out["running"] and out["done"] == "spawned" and out["text"] == "via asyncio"
    assert (out["first"].type, out["first"].path) == ("create", "/root/watched")
    assert out["typed"].endswith(b"got-xyz") and out["term_exit"] == 0
    assert "sleep 0.3; echo a" in seen.pre and "echo b" in seen.post  # callbacks fired
    from smolvm import SmolVMManager

    with SmolVMManager(data_dir=data_dir) as m:
        assert m.list_vms() == []  # gone on `async with` exit
        m.delete_snapshot(out["snap"])
