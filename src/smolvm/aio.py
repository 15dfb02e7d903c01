"""``AsyncSmolVM``: SmolVM for asyncio code. One core: every call runs the synchronous
``SmolVM`` method on a worker thread (``asyncio.to_thread``), so guards, audit and every
other callback fire exactly as they do for sync code.

    async with AsyncSmolVM() as vm:
        print((await vm.run("echo hi")).output)
        async for ev in vm.stream("make"):
            print(ev.kind, ev.data)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from smolvm.files import FileInfo, Files, FilesystemEvent, WatchHandle
from smolvm.smolvm import SmolVM
from smolvm.terminal import PtyHandle
from smolvm.transports.base import ProcessHandle
from smolvm.types import CommandResult


@dataclass(frozen=True)
class StreamEvent:
    """One event of :meth:`AsyncSmolVM.stream`: ``kind`` "stdout"/"stderr" with ``data``
    (bytes as they arrived), then one "exit" with ``result`` (the ``CommandResult``)."""

    kind: str
    data: bytes = b""
    result: CommandResult | None = None


class AsyncProcessHandle:
    """A spawned process (``await h.wait()``, ``await h.kill()``, ``h.is_running()``)."""

    def __init__(self, handle: ProcessHandle) -> None:
        self.sync = handle

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """The result once it exits (``timeout`` seconds; None waits forever)."""
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def kill(self, signal: int = 9) -> None:
        await asyncio.to_thread(self.sync.kill, signal)

    def is_running(self) -> bool:
        return self.sync.is_running()


class AsyncWatch:
    """``async for event in await vm.files.watch(path)``: a watch for asyncio; ``stop()``
    (or leaving ``async with``) ends it."""

    def __init__(self, handle: WatchHandle) -> None:
        self.sync = handle

    async def get(self, timeout: float | None = None) -> FilesystemEvent | None:
        return await asyncio.to_thread(self.sync.get, timeout)

    def __aiter__(self) -> AsyncIterator[FilesystemEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[FilesystemEvent]:
        while (ev := await asyncio.to_thread(self.sync.get)) is not None:
            yield ev

    def stop(self) -> None:
        self.sync.stop()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


class AsyncPty:
    """A terminal for asyncio (see :class:`smolvm.terminal.PtyHandle`)."""

    def __init__(self, handle: PtyHandle) -> None:
        self.sync = handle

    async def read(self, timeout: float | None = None) -> bytes:
        return await asyncio.to_thread(self.sync.read, timeout)

    async def read_until(self, marker: bytes | str, timeout: float = 10.0) -> bytes:
        return await asyncio.to_thread(self.sync.read_until, marker, timeout)

    async def write(self, data: bytes | str) -> None:
        await asyncio.to_thread(self.sync.write, data)

    async def resize(self, cols: int, rows: int) -> None:
        await asyncio.to_thread(self.sync.resize, cols, rows)

    async def wait(self, timeout: float | None = None) -> CommandResult:
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sync.kill)

    def is_running(self) -> bool:
        return self.sync.is_running()


class AsyncFiles:
    """``vm.files`` for asyncio (see :class:`smolvm.files.Files`)."""

    def __init__(self, files: Files) -> None:
        self.sync = files

    async def read(self, path: str, **kw: Any) -> bytes:
        return await asyncio.to_thread(self.sync.read, path, **kw)

    async def read_text(self, path: str, encoding: str = "utf-8", **kw: Any) -> str:
        return await asyncio.to_thread(self.sync.read_text, path, encoding, **kw)

    async def write(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        await asyncio.to_thread(self.sync.write, path, data, mode)

    async def list(self, path: str = "/") -> list[FileInfo]:
        return await asyncio.to_thread(self.sync.list, path)

    async def exists(self, path: str) -> bool:
        return await asyncio.to_thread(self.sync.exists, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await asyncio.to_thread(self.sync.remove, path, recursive=recursive)

    async def make_dir(self, path: str, **kw: Any) -> None:
        await asyncio.to_thread(self.sync.make_dir, path, **kw)

    async def rename(self, src: str, dst: str) -> None:
        await asyncio.to_thread(self.sync.rename, src, dst)

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncWatch:
        return AsyncWatch(await asyncio.to_thread(self.sync.watch, path, recursive=recursive))


class AsyncSmolVM:
    """A sandbox for asyncio code; arguments as for :class:`SmolVM` (the VM is created on
    ``async with`` entry or :meth:`create`, off the event loop)."""

    #: Methods of SmolVM offered as coroutines with the same arguments.
    PASSTHROUGH = (
        "start",
        "stop",
        "delete",
        "pause",
        "resume",
        "snapshot",
        "upload_file",
        "download_file",
        "set_env_vars",
        "unset_env_vars",
        "list_env_vars",
        "expose_local",
        "unexpose_local",
        "refresh",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self._vm: SmolVM | None = None

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> AsyncSmolVM:
        """A started sandbox (close it with :meth:`aclose` or ``async with``)."""
        vm = cls(*args, **kwargs)
        await vm.__aenter__()
        return vm

    @classmethod
    async def from_id(cls, vm_id: str, **kwargs: Any) -> AsyncSmolVM:
        vm = cls()
        vm._vm = await asyncio.to_thread(SmolVM.from_id, vm_id, **kwargs)
        return vm

    @property
    def sync(self) -> SmolVM:
        """The underlying ``SmolVM``."""
        if self._vm is None:
            raise RuntimeError("enter `async with AsyncSmolVM()` (or await AsyncSmolVM.create()) first")
        return self._vm

    @property
    def vm_id(self) -> str:
        return self.sync.vm_id

    @property
    def files(self) -> AsyncFiles:
        return AsyncFiles(self.sync.files)

    async def pty(self, command: str | None = None, cols: int = 80, rows: int = 24, **kw: Any) -> AsyncPty:
        """An interactive terminal (see :meth:`SmolVM.pty`)."""
        return AsyncPty(await asyncio.to_thread(self.sync.pty, command, cols, rows, **kw))

    async def __aenter__(self) -> AsyncSmolVM:
        if self._vm is None:
            self._vm = await asyncio.to_thread(SmolVM, *self._args, **self._kwargs)
        await asyncio.to_thread(self._vm.__enter__)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.sync.__exit__, *exc)

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)

    def __getattr__(self, name: str) -> Any:
        if name not in self.PASSTHROUGH:
            raise AttributeError(name)
        method = getattr(self.sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        call.__doc__ = method.__doc__
        return call

    async def run(
        self, command: str, timeout: float | None = 30, shell: str = "login", **kw: Any
    ) -> CommandResult:
        """:meth:`SmolVM.run` (same arguments, callbacks and errors)."""
        return await asyncio.to_thread(self.sync.run, command, timeout, shell, **kw)

    async def spawn(self, command: str, shell: str = "login", **kw: Any) -> AsyncProcessHandle:
        """:meth:`SmolVM.spawn`, returning an awaitable handle."""
        return AsyncProcessHandle(await asyncio.to_thread(self.sync.spawn, command, shell, **kw))

    async def stream(
        self, command: str, timeout: float | None = 30, shell: str = "login", **kw: Any
    ) -> AsyncIterator[StreamEvent]:
        """Run ``command``, yielding its output as it arrives, then an "exit" event with the
        result (a failure to run raises, as :meth:`run` does). Nothing is kept in memory
        beyond what the consumer has not read yet."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()

        def push(item: StreamEvent | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                r = self.sync.run(
                    command,
                    timeout,
                    shell,
                    on_stdout=lambda b: push(StreamEvent("stdout", b)),
                    on_stderr=lambda b: push(StreamEvent("stderr", b)),
                    capture=False,
                    **kw,
                )
                push(StreamEvent("exit", result=r))
            except BaseException as exc:  # handed to the consumer
                push(exc)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.kind == "exit":
                    return
        finally:
            await task
