"""Shapes of shell code the SafetyGuard recognises by structure (bashlex trees), and the
extra rules of ``SafetyPolicy(strict=True)``.

Strict mode blocks what cannot be judged statically: a command name, an ``eval`` or a
destructive command's target that comes from an expansion; a shell reading its script from
a pipe or file the guard cannot see; destructive commands run by ``xargs``; endless loops
that start background jobs. The guard is a seatbelt for honest mistakes and obvious attacks;
the VM and the host's network policy are the boundary.
"""

from __future__ import annotations

import re
from typing import Any

from smolvm.guards.rules import Rule, SafetyPolicy, SimpleCommand
from smolvm.guards.wrappers import unwrap

#: Programs whose targets must be literal in strict mode.
DESTRUCTIVE = frozenset(
    {"rm", "rmdir", "unlink", "shred", "dd", "wipefs", "truncate", "mkswap", "fdisk", "sfdisk", "parted",
     "blkdiscard", "chmod", "chown", "chattr", "mv", "find"}
)  # fmt: skip
_DYNAMIC = re.compile(r"\$|`")
_GLOB = re.compile(r"[*?\[]")
STRICT_RULES = {
    "dynamic-command": "the command name comes from an expansion or a glob (strict)",
    "dynamic-target": "a destructive command's target comes from an expansion (strict)",
    "eval-expansion": "eval of an expansion (strict)",
    "xargs-destructive": "xargs runs a destructive command on data the guard cannot see (strict)",
    "shell-reads-stdin": "a shell reads its script from a pipe, file or stdin the guard cannot see (strict)",
    "spawn-loop": "an endless loop starts background jobs (fork bomb; strict)",
}


def children(node: Any) -> list[Any]:
    out = []
    for attr in ("parts", "list"):
        v = getattr(node, attr, None)
        if isinstance(v, list):
            out.extend(v)
    for attr in ("command", "output"):
        v = getattr(node, attr, None)
        if v is not None and hasattr(v, "kind"):
            out.append(v)
    return out


def call_name(node: Any) -> str | None:
    words = [p.word for p in node.parts if p.kind == "word"]
    for _ in range(8):
        if not words:
            return None
        un = unwrap(words)
        if un is None or un.argv is None:
            return words[0]
        words = un.argv
    return words[0] if words else None


def self_spawning(name: str, body: Any) -> bool:
    """True when ``body`` calls ``name`` inside a pipeline or in the background."""

    def visit(node: Any, in_pipe: bool, bg: bool) -> bool:
        kind = node.kind
        if kind == "pipeline":
            cmds = [p for p in node.parts if p.kind not in ("pipe", "reservedword")]
            return any(visit(c, in_pipe or len(cmds) > 1, bg) for c in cmds)
        if kind == "list":
            parts = node.parts
            for i, p in enumerate(parts):
                if p.kind == "operator":
                    continue
                nxt = parts[i + 1] if i + 1 < len(parts) else None
                b = bg or (nxt is not None and nxt.kind == "operator" and nxt.op == "&")
                if visit(p, in_pipe, b):
                    return True
            return False
        if kind == "command":
            if (in_pipe or bg) and call_name(node) == name:
                return True
        return any(visit(c, in_pipe, bg) for c in children(node))

    return visit(body, False, False)


_ENDLESS = re.compile(r"^\s*(while\s+(true|:|\[\s*1\s*\]|\(\(\s*1\s*\)\))|until\s+false)\s*[;\n]\s*do\b")


def spawn_loop(text: str, node: Any) -> bool:
    """``while true; do ... & done``: an endless loop whose body backgrounds a job."""
    if not _ENDLESS.match(text):
        return False

    def bg(n: Any) -> bool:
        if n.kind == "operator" and getattr(n, "op", "") == "&":
            return True
        return any(bg(c) for c in children(n))

    return bg(node)


def _dynamic_command(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    name = cmd.argv[0] if cmd.argv else ""
    if name not in ("[", "[[") and (_DYNAMIC.search(name) or _GLOB.search(name)):
        return f"command name {name!r} is decided at run time"
    return None


def _dynamic_target(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    prog = cmd.program
    if prog in DESTRUCTIVE or prog.startswith("mkfs"):
        for a in cmd.args:
            if _DYNAMIC.search(a):
                return f"{prog} target {a!r} is decided at run time"
    return None


def _eval_expansion(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    if cmd.program == "eval" and any(_DYNAMIC.search(a) for a in cmd.args):
        return "eval runs text decided at run time"
    return None


def _xargs_destructive(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    if cmd.program != "xargs":
        return None
    rest = [a for a in cmd.args if not a.startswith("-")]
    inner = unwrap(rest) if rest else None
    prog = (inner.argv[0] if inner and inner.argv else rest[0] if rest else "").rsplit("/", 1)[-1]
    if prog in DESTRUCTIVE or prog.startswith("mkfs") or prog in ("sh", "bash", "dash", "zsh"):
        return f"xargs feeds unseen input to {prog}"
    return None


#: Rules that run on every simple command when ``SafetyPolicy.strict`` is set.
STRICT_BUILTIN: tuple[Rule, ...] = (
    Rule("dynamic-command", STRICT_RULES["dynamic-command"], _dynamic_command),
    Rule("dynamic-target", STRICT_RULES["dynamic-target"], _dynamic_target),
    Rule("eval-expansion", STRICT_RULES["eval-expansion"], _eval_expansion),
    Rule("xargs-destructive", STRICT_RULES["xargs-destructive"], _xargs_destructive),
)
