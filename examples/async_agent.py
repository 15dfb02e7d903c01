"""Async use: several sandboxes from one event loop, output streamed as it arrives."""

import asyncio

from smolvm import AsyncSmolVM


async def one(n: int) -> str:
    async with AsyncSmolVM() as vm:
        async for ev in vm.stream(f"for i in 1 2; do echo box{n}-$i; done"):
            if ev.kind == "stdout":
                print(ev.data.decode(), end="", flush=True)
        await vm.files.write("/root/n.txt", str(n))
        return await vm.files.read_text("/root/n.txt")


async def main() -> None:
    results = await asyncio.gather(one(1), one(2))
    print("results:", results)


asyncio.run(main())
