"""An MCP client (the official ``mcp`` SDK) using SmolVM sandboxes as tools: it starts
``smolvm mcp`` over stdio, exactly as an agent host (Claude Desktop, an IDE) would from a
configuration like::

    {"mcpServers": {"smolvm": {"command": "smolvm", "args": ["mcp", "--guard", "safety"]}}}
"""

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main() -> None:
    server = StdioServerParameters(command="smolvm", args=["mcp", "--guard", "safety"])
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        print("tools:", ", ".join(sorted(t.name for t in (await session.list_tools()).tools)))
        made = await session.call_tool("create_sandbox", {})
        box = made.structured_content["sandbox_id"]
        ran = await session.call_tool("run_command", {"sandbox_id": box, "command": "uname -s"})
        print("uname:", ran.structured_content["stdout"].strip())
        refused = await session.call_tool("run_command", {"sandbox_id": box, "command": "rm -rf /"})
        print("rm -rf / refused:", refused.is_error)
        # Nothing to delete: the session's sandboxes go when it ends.


anyio.run(main)
