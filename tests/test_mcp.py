"""``smolvm mcp`` driven by the official ``mcp`` client SDK over stdio (and HTTP), with
real guests: tools, a session's sandboxes deleted at its end, a guarded server refusing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from smolvm.cli.mcp_server import TOOLS

pytestmark = pytest.mark.e2e


def params(data_dir: Path, *args: str) -> Any:
    from mcp import StdioServerParameters

    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "smolvm.cli.main", "mcp", *args],
        env={**os.environ, "SMOLVM_DATA_DIR": str(data_dir)},
    )


def session(data_dir: Path, fn: Callable[[Any], Awaitable[Any]], *args: str) -> Any:
    from mcp import ClientSession
    from mcp.client.stdio import stdio_client

    async def main() -> Any:
        async with stdio_client(params(data_dir, *args)) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            return await fn(s)

    return anyio.run(main)


async def call(s: Any, tool: str, **arguments: Any) -> Any:
    """A tool's result as data (raises AssertionError on a tool error)."""
    r = await s.call_tool(tool, arguments)
    assert not r.is_error, (tool, r.content)
    data = r.structured_content
    if data is None:
        data = json.loads(r.content[0].text)
    return data.get("result", data) if isinstance(data, dict) and set(data) == {"result"} else data


def test_tools_over_stdio_and_the_session_cleans_up(data_dir: Path, default_image) -> None:
    from smolvm import SmolVMManager

    async def work(s: Any) -> dict[str, Any]:
        names = sorted(t.name for t in (await s.list_tools()).tools)
        box = (await call(s, "create_sandbox"))["sandbox_id"]
        kept = (await call(s, "create_sandbox", keep=True))["sandbox_id"]
        ran = await call(s, "run_command", sandbox_id=box, command="echo hi; echo err >&2; exit 3")
        await call(s, "write_file", sandbox_id=box, path="/root/notes.txt", content="hello mcp\n")
        read = await call(s, "read_file", sandbox_id=box, path="/root/notes.txt")
        listing = await call(s, "list_files", sandbox_id=box, path="/root")
        listed = [v["sandbox_id"] for v in await call(s, "list_sandboxes")]
        gone = (await call(s, "create_sandbox"))["sandbox_id"]
        await call(s, "delete_sandbox", sandbox_id=gone)
        bad = await s.call_tool("read_file", {"sandbox_id": box, "path": "/nope"})
        return {
            "names": names,
            "box": box,
            "kept": kept,
            "ran": ran,
            "read": read,
            "listing": listing,
            "listed": listed,
            "gone": gone,
            "bad": bad,
        }

    out = session(data_dir, work)
    with SmolVMManager(data_dir=data_dir) as m:
        left = [v.vm_id for v in m.list_vms()]
        for vm_id in left:  # keep=true outlives the session (and would outlive this test)
            m.delete(vm_id)
    assert left == [out["kept"]]  # the session's sandboxes went with it; keep=true stayed
    assert out["names"] == sorted(TOOLS)
    assert out["ran"] == {"exit_code": 3, "stdout": "hi\n", "stderr": "err\n", "truncated": False}
    assert out["read"]["content"] == "hello mcp\n" and out["read"]["encoding"] == "utf-8"
    notes = next(e for e in out["listing"] if e["name"] == "notes.txt")
    assert notes["type"] == "file" and notes["size"] == 10 and notes["mode"] == "644"
    assert {out["box"], out["kept"]} <= set(out["listed"]) and out["gone"] not in out["listed"]
    assert out["bad"].is_error and "nope" in out["bad"].content[0].text


def test_a_guarded_server_refuses_with_a_tool_error(data_dir: Path, default_image) -> None:
    async def work(s: Any) -> tuple[Any, Any]:
        box = (await call(s, "create_sandbox"))["sandbox_id"]
        refused = await s.call_tool("run_command", {"sandbox_id": box, "command": "rm -rf /"})
        fine = await call(s, "run_command", sandbox_id=box, command="echo still-here")
        return refused, fine

    refused, fine = session(data_dir, work, "--guard", "safety", "--audit")
    assert refused.is_error and "blocked" in refused.content[0].text.lower(), refused.content
    assert fine["stdout"] == "still-here\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_needs_the_bearer_token(data_dir: Path, default_image) -> None:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolvm.cli.main", "mcp", "--http", "--port", str(port), "--token", "t0ken"],
        env={**os.environ, "SMOLVM_DATA_DIR": str(data_dir)},
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx2.post(url, json={})
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.1)
        assert r.status_code == 401

        async def main() -> list[str]:
            headers = {"Authorization": "Bearer t0ken"}
            async with (
                httpx2.AsyncClient(headers=headers) as client,
                streamable_http_client(url, http_client=client) as streams,
                ClientSession(streams[0], streams[1]) as s,
            ):
                await s.initialize()
                return sorted(t.name for t in (await s.list_tools()).tools)

        assert anyio.run(main) == sorted(TOOLS)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
