"""``smolvm mcp``: sandboxes as Model Context Protocol tools (official ``mcp`` SDK).

Stdio by default (an MCP client starts ``smolvm mcp`` and talks over its stdin/stdout);
``--http`` serves streamable HTTP on 127.0.0.1 with a bearer token. Every sandbox a server
creates is owned by the server process: deleted when the session ends (or the process dies,
by its watchdog) unless created with ``keep=true``. ``--guard safety|strict`` vets every
command with ``SafetyGuard``; ``--audit`` records every tool call in the audit log.
Guards are a seatbelt: the VM and the host-enforced network policy are the boundary.
"""

from __future__ import annotations

import base64
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from smolvm.callbacks import Callback
from smolvm.exceptions import SmolVMError, ValidationError
from smolvm.types import InternetSettings

if TYPE_CHECKING:
    from smolvm import SmolVM

log = logging.getLogger(__name__)

#: Most bytes ``read_file`` returns and ``run_command`` keeps per stream (MCP messages are
#: read whole by the client: keep them small).
MAX_READ = 1024 * 1024
MAX_OUTPUT = 256 * 1024
TOOLS = (
    "create_sandbox",
    "list_sandboxes",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
    "expose_port",
    "snapshot_sandbox",
    "delete_sandbox",
)


class Sandboxes:
    """The sandboxes of one server: created, looked up and deleted by id (thread-safe)."""

    def __init__(self, data_dir: Path | None, callbacks: list[Callback], audit: Any | None = None) -> None:
        self.data_dir = data_dir
        self.callbacks = callbacks
        self.audit = audit
        self._vms: dict[str, SmolVM] = {}
        self._keep: set[str] = set()
        self._lock = threading.Lock()

    def record(self, tool: str, vm_id: str, detail: str, fn: Callable[[], Any]) -> Any:
        """Run one tool call, recording it in the audit log when there is one (commands
        are recorded by AuditLog's own run hooks)."""
        t0 = time.time()
        error: BaseException | None = None
        try:
            return fn()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self.audit is not None and tool != "run_command":
                what = f"[mcp] {tool} {detail}"
                self.audit.record_op(vm_id or "-", what, "mcp", error, started_at=t0, channel="mcp")

    def create(
        self,
        snapshot: str | None,
        memory: int | None,
        internet: InternetSettings | None,
        keep: bool,
    ) -> SmolVM:
        from smolvm import SmolVM

        common: dict[str, Any] = {"callbacks": list(self.callbacks), "data_dir": self.data_dir}
        if snapshot:
            vm = SmolVM.from_snapshot(snapshot, internet_settings=internet, detached=keep, **common)
        else:
            vm = SmolVM(memory=memory, internet_settings=internet, detached=keep, **common)
        try:
            vm.start() if vm.status.value in ("created", "stopped") else None
        except BaseException:
            vm.__exit__(None, None, None)
            raise
        with self._lock:
            self._vms[vm.vm_id] = vm
            if keep:
                self._keep.add(vm.vm_id)
        return vm

    def get(self, sandbox_id: str) -> SmolVM:
        with self._lock:
            vm = self._vms.get(sandbox_id)
        if vm is None:
            from smolvm import SmolVM

            vm = SmolVM.from_id(sandbox_id, data_dir=self.data_dir, callbacks=list(self.callbacks))
            with self._lock:
                self._vms[sandbox_id] = vm
                self._keep.add(sandbox_id)  # not ours: never deleted at session end
        return vm

    def delete(self, sandbox_id: str) -> None:
        vm = self.get(sandbox_id)
        vm.delete()
        vm.close()
        with self._lock:
            self._vms.pop(sandbox_id, None)
            self._keep.discard(sandbox_id)

    def close(self) -> None:
        """Session end: delete what this server created (unless kept), close the rest."""
        with self._lock:
            vms, keep = dict(self._vms), set(self._keep)
            self._vms.clear()
        for vm_id, vm in vms.items():
            try:
                if vm_id not in keep:
                    vm.delete()
                vm.close()
            except Exception as exc:  # one failure must not keep the others alive
                log.warning("closing sandbox %s: %s", vm_id, exc)


def build_server(sandboxes: Sandboxes) -> Any:
    """The MCP server (the SDK's ``MCPServer``) with SmolVM's tools."""
    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    @asynccontextmanager
    async def lifespan(_server: Any) -> AsyncIterator[Sandboxes]:
        try:
            yield sandboxes
        finally:
            await anyio.to_thread.run_sync(sandboxes.close)

    server = MCPServer("smolvm", lifespan=lifespan)

    async def call(tool: str, sandbox_id: str, detail: str, fn: Callable[[], Any]) -> Any:
        try:
            return await anyio.to_thread.run_sync(lambda: sandboxes.record(tool, sandbox_id, detail, fn))
        except SmolVMError as exc:  # a tool error the agent can read (the SDK hides others)
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc

    @server.tool()
    async def create_sandbox(
        snapshot: str | None = None,
        memory_mib: int | None = None,
        internet: bool = True,
        allowed_domains: list[str] | None = None,
        keep: bool = False,
    ) -> dict[str, Any]:
        """Create and start a fresh Linux sandbox (a microVM). Returns its sandbox_id.

        snapshot: start from this snapshot (see snapshot_sandbox). memory_mib: guest RAM in
        MiB. internet: False seals it off entirely; allowed_domains limits it to those
        names. keep: survive the end of this session (otherwise deleted then)."""
        settings = InternetSettings(
            allowed_domains=allowed_domains if allowed_domains is not None else (["*"] if internet else [])
        )
        vm = await call(
            "create_sandbox",
            "",
            f"snapshot={snapshot} keep={keep}",
            lambda: sandboxes.create(snapshot, memory_mib, settings, keep),
        )
        return {"sandbox_id": vm.vm_id, "status": vm.status.value}

    @server.tool()
    async def list_sandboxes() -> list[dict[str, Any]]:
        """Sandboxes on this host: id, status, memory (MiB), created (UTC)."""

        def run() -> list[dict[str, Any]]:
            from smolvm import SmolVMManager

            with SmolVMManager(data_dir=sandboxes.data_dir) as m:
                return [
                    {
                        "sandbox_id": v.vm_id,
                        "status": v.status.value,
                        "memory_mib": v.config.mem_size_mib,
                        "created": str(v.created_at),
                    }
                    for v in m.list_vms()
                ]

        return await call("list_sandboxes", "", "", run)

    @server.tool()
    async def run_command(sandbox_id: str, command: str, timeout: float = 60) -> dict[str, Any]:
        """Run a shell command in the sandbox and wait (timeout in seconds). Returns
        exit_code, stdout, stderr (each at most 256 KiB) and truncated."""

        def run() -> dict[str, Any]:
            r = sandboxes.get(sandbox_id).run(command, timeout=timeout, max_output_bytes=MAX_OUTPUT)
            return {
                "exit_code": r.exit_code,
                "stdout": r.stdout,
                "stderr": r.stderr,
                "truncated": r.truncated,
            }

        return await call("run_command", sandbox_id, command, run)

    @server.tool()
    async def write_file(
        sandbox_id: str, path: str, content: str, base64_encoded: bool = False, mode: int | None = None
    ) -> dict[str, Any]:
        """Write a file in the sandbox (content is text, or base64 with base64_encoded)."""
        data = base64.b64decode(content) if base64_encoded else content.encode()

        def run() -> dict[str, Any]:
            sandboxes.get(sandbox_id).files.write(path, data, mode)
            return {"path": path, "bytes": len(data)}

        return await call("write_file", sandbox_id, path, run)

    @server.tool()
    async def read_file(sandbox_id: str, path: str) -> dict[str, Any]:
        """Read a file from the sandbox (at most 1 MiB). Text comes back as is, anything
        else base64-encoded (encoding says which)."""

        def run() -> dict[str, Any]:
            raw = sandboxes.get(sandbox_id).files.read(path, max_bytes=MAX_READ)
            try:
                return {"path": path, "encoding": "utf-8", "content": raw.decode("utf-8")}
            except UnicodeDecodeError:
                return {"path": path, "encoding": "base64", "content": base64.b64encode(raw).decode()}

        return await call("read_file", sandbox_id, path, run)

    @server.tool()
    async def list_files(sandbox_id: str, path: str = "/root") -> list[dict[str, Any]]:
        """Entries of a directory in the sandbox: name, type (file, dir, link, other), size
        (bytes), mode (octal string), mtime (Unix seconds)."""

        def run() -> list[dict[str, Any]]:
            return [
                {"name": i.name, "type": i.type, "size": i.size, "mode": f"{i.mode:o}", "mtime": i.mtime}
                for i in sandboxes.get(sandbox_id).files.list(path)
            ]

        return await call("list_files", sandbox_id, path, run)

    @server.tool()
    async def expose_port(sandbox_id: str, guest_port: int) -> dict[str, Any]:
        """Serve the sandbox's TCP guest_port on this host's 127.0.0.1 (never other
        interfaces). Returns host_port."""
        port = await call(
            "expose_port",
            sandbox_id,
            str(guest_port),
            lambda: sandboxes.get(sandbox_id).expose_local(guest_port),
        )
        return {"host": "127.0.0.1", "host_port": port, "guest_port": guest_port}

    @server.tool()
    async def snapshot_sandbox(sandbox_id: str, name: str | None = None) -> dict[str, Any]:
        """Save the sandbox (memory, disk) as a snapshot; create_sandbox(snapshot=...) starts
        copies of it. The sandbox keeps running."""
        info = await call(
            "snapshot_sandbox", sandbox_id, name or "", lambda: sandboxes.get(sandbox_id).snapshot(name)
        )
        return {"snapshot": info.snapshot_id}

    @server.tool()
    async def delete_sandbox(sandbox_id: str) -> dict[str, Any]:
        """Delete the sandbox and everything it had."""
        await call("delete_sandbox", sandbox_id, "", lambda: sandboxes.delete(sandbox_id))
        return {"deleted": sandbox_id}

    return server


def serve(
    *,
    http: bool,
    port: int,
    guard: str | None,
    audit: bool,
    data_dir: Path | None,
    token: str | None,
) -> None:
    """Run the server until its client goes away (stdio) or it is interrupted (HTTP)."""
    callbacks: list[Callback] = []
    if guard:
        from smolvm.guards import SafetyGuard

        if guard not in ("safety", "strict"):
            raise ValidationError(f"--guard must be safety or strict, got {guard!r}", field="guard")
        callbacks.append(SafetyGuard(strict=guard == "strict"))
    log_ = None
    if audit:
        from smolvm.guards import AuditLog

        log_ = AuditLog()
        callbacks.append(log_)
    sandboxes = Sandboxes(data_dir, callbacks, log_)
    if not http:
        build_server(sandboxes).run("stdio")
        return
    secret = token or secrets.token_urlsafe(24)
    print(f"smolvm mcp: http://127.0.0.1:{port}/mcp  bearer token: {secret}", file=sys.stderr, flush=True)
    _serve_http(build_server(sandboxes), secret, port)


def _serve_http(server: Any, secret: str, port: int) -> None:
    """Streamable HTTP on 127.0.0.1 only, every request with ``Authorization: Bearer``."""
    import uvicorn
    from starlette.responses import JSONResponse

    app = server.streamable_http_app(host="127.0.0.1")
    want = f"Bearer {secret}".encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if not secrets.compare_digest(headers.get(b"authorization", b""), want):
                await JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)(
                    scope, receive, send
                )
                return
        await app(scope, receive, send)

    uvicorn.run(guarded, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


def command(
    http: Annotated[
        bool, typer.Option("--http", help="Streamable HTTP on 127.0.0.1 instead of stdio.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="HTTP port (with --http).")] = 8765,
    guard: Annotated[
        str | None, typer.Option("--guard", help="Vet every command: safety, or strict (SafetyGuard).")
    ] = None,
    audit: Annotated[bool, typer.Option("--audit", help="Record every tool call in the audit log.")] = False,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="SMOLVM_MCP_TOKEN", help="Bearer token for --http (random if unset)."),
    ] = None,
) -> None:
    """Serve sandboxes to AI agents over the Model Context Protocol (stdio by default)."""
    import os

    data_dir = os.environ.get("SMOLVM_DATA_DIR")
    serve(
        http=http,
        port=port,
        guard=guard,
        audit=audit,
        data_dir=Path(data_dir) if data_dir else None,
        token=token,
    )
