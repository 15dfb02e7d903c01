"""SafetyGuard: a shell-aware policy callback that vetoes destructive commands.

The command is parsed with bashlex and the syntax tree is walked: lists, pipelines,
``;``/``&&``/``||`` chains, subshells, ``{ }`` groups, ``if``/``for``/``while``/``case``,
command and process substitutions, here-documents, function definitions, and command
strings handed to a shell again (``bash -c``, ``sh -c``, ``eval``, ``su -c``, ``watch``,
``echo ... | sh``, ``sh <<EOF``). Wrappers (``sudo``, ``env``, ``nice``, ``nohup``,
``timeout``, ``xargs``, ``busybox``, ``command``, ``exec``, ...) are peeled off. Every
simple command found is checked by the enabled rules; the first hit blocks.

Quoted text is data, not a command: ``echo "rm -rf /"`` is allowed, while
``echo $(rm -rf /)`` is blocked.

Use :func:`check_command` to test a command string without a VM.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any

import bashlex
import bashlex.errors

from smolvm.callbacks import Callback, FileContext, RunContext
from smolvm.exceptions import CommandBlockedError, ValidationError
from smolvm.guards import shellparse as sp
from smolvm.guards.rules import (
    BUILTIN_RULES,
    DEFAULT_PROTECTED_PATHS,
    RULES,
    UNPARSEABLE,
    Rule,
    SimpleCommand,
    normpath,
    resolve_path,
    startup_path,
)
from smolvm.guards.strict import STRICT_BUILTIN, STRICT_RULES, children, self_spawning, spawn_loop
from smolvm.guards.wrappers import unwrap

TOO_LONG = "too-long"

# --------------------------------------------------------------------------------------
# Verdicts and the policy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Why a command is blocked.

    Attributes:
        rule: name of the rule that fired (see :data:`RULES`).
        reason: what the offending sub-command does.
        subcommand: the offending simple command as written (after unwrapping ``bash -c``).
        command: the whole command that was checked.
    """

    rule: str
    reason: str
    subcommand: str
    command: str

    @property
    def message(self) -> str:
        return (
            f"Blocked by SafetyGuard rule {self.rule!r}: {self.reason} (in sub-command {self.subcommand!r})"
        )

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SafetyPolicy:
    """Configuration of :class:`SafetyGuard` / :func:`check_command` (immutable).

    Attributes:
        disabled_rules: names of rules to skip (see :data:`RULES`).
        protected_paths: absolute paths (or ``~``) that must not be deleted recursively,
            nor ``chmod -R``/``chown -R``'d; ancestors of them are protected as well, and so
            are globs covering their contents (``/usr/*``).
        denied_programs: extra program names blocked outright (rule ``denied-program``),
            matched on the basename after wrappers are removed.
        allow_patterns: regular expressions; a simple command whose text fully matches one
            is exempt from every rule (its substitutions are still checked).
        fail_closed: block commands bashlex cannot parse (rule ``unparseable``). With
            ``False`` they are allowed.
        block_device_reads: also block *reading* raw block devices (``cat /dev/vda``).
        max_depth: nesting limit for re-parsed command strings; deeper is treated as
            unparseable.
        extra_rules: additional :class:`Rule` objects run after the built-in ones.
        strict: also block what cannot be judged statically (see ``guards.strict``):
            expansions as command names, ``eval`` or destructive targets, a shell reading an
            unseen script, ``xargs`` into destructive commands, endless loops of background jobs.
        max_command_length: longer commands are blocked (rule ``too-long``).
    """

    disabled_rules: frozenset[str] = frozenset()
    protected_paths: tuple[str, ...] = DEFAULT_PROTECTED_PATHS
    denied_programs: frozenset[str] = frozenset()
    allow_patterns: tuple[str, ...] = ()
    fail_closed: bool = True
    block_device_reads: bool = False
    max_depth: int = 8
    extra_rules: tuple[Rule, ...] = ()
    strict: bool = False
    max_command_length: int = 1_048_576
    _allow_re: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)
    _protected_norm: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled_rules", frozenset(self.disabled_rules))
        object.__setattr__(self, "denied_programs", frozenset(self.denied_programs))
        object.__setattr__(self, "protected_paths", tuple(self.protected_paths))
        object.__setattr__(self, "allow_patterns", tuple(self.allow_patterns))
        object.__setattr__(self, "extra_rules", tuple(self.extra_rules))
        known = set(RULES) | {UNPARSEABLE, TOO_LONG} | set(STRICT_RULES) | {r.name for r in self.extra_rules}
        unknown = sorted(set(self.disabled_rules) - known)
        if unknown:
            raise ValidationError(
                f"unknown SafetyGuard rule(s) {unknown}; known rules: {sorted(known)}",
                field="disabled_rules",
            )
        for p in self.protected_paths:
            if not isinstance(p, str) or not (p.startswith("/") or p.startswith("~")):
                raise ValidationError(
                    f"protected path {p!r} must be absolute or start with '~'", field="protected_paths"
                )
        if self.max_depth < 1:
            raise ValidationError("max_depth must be >= 1", field="max_depth")
        try:
            compiled = tuple(re.compile(p) for p in self.allow_patterns)
        except re.error as exc:
            raise ValidationError(f"invalid allow pattern: {exc}", field="allow_patterns") from None
        object.__setattr__(self, "_allow_re", compiled)
        object.__setattr__(self, "_protected_norm", tuple(normpath(p) for p in self.protected_paths))

    @property
    def protected_norm(self) -> tuple[str, ...]:
        """``protected_paths``, normalised (what the rules compare against)."""
        return self._protected_norm

    def is_enabled(self, rule: str) -> bool:
        return rule not in self.disabled_rules

    def disable(self, *rules: str) -> SafetyPolicy:
        """A copy with ``rules`` disabled."""
        return replace(self, disabled_rules=self.disabled_rules | set(rules))

    def enable(self, *rules: str) -> SafetyPolicy:
        """A copy with ``rules`` enabled again."""
        return replace(self, disabled_rules=self.disabled_rules - set(rules))

    def allowed(self, text: str) -> bool:
        return any(r.fullmatch(text.strip()) for r in self._allow_re)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules that run, in order."""
        strict = STRICT_BUILTIN if self.strict else ()
        return tuple(r for r in (*BUILTIN_RULES, *strict, *self.extra_rules) if self.is_enabled(r.name))


# --------------------------------------------------------------------------------------
# The analyzer
# --------------------------------------------------------------------------------------


class _Blocked(Exception):
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict


class _Scope:
    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.env = dict(env or {"HOME": "~", "IFS": " "})
        self.cwd = cwd

    def copy(self) -> _Scope:
        return _Scope(self.env, self.cwd)


_PARAM = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class _Analyzer:
    def __init__(self, policy: SafetyPolicy, command: str, stdin: str | None = None) -> None:
        self.policy = policy
        self.command = command
        self.stdin = stdin  # what run(..., stdin=) feeds the top-level command

    # -- entry points ------------------------------------------------------------------

    def run(self) -> Verdict | None:
        try:
            if len(self.command) > self.policy.max_command_length:
                limit = self.policy.max_command_length
                self.block(TOO_LONG, f"command is {len(self.command)} characters (limit {limit})", "")
            self.analyze(self.command, 0, _Scope())
        except _Blocked as b:
            return b.verdict
        return None

    def block(self, rule: str, reason: str, sub: str) -> None:
        raise _Blocked(Verdict(rule, reason, sub.strip(), self.command))

    def analyze(self, text: str, depth: int, scope: _Scope) -> None:
        if depth > self.policy.max_depth:
            if self.policy.fail_closed:
                self.block(UNPARSEABLE, f"command nesting deeper than {self.policy.max_depth} levels", text)
            return
        if not text.strip():
            return
        parsed, src, quoted = self._parse(text)
        if parsed is None:
            if self.policy.fail_closed:
                self.block(
                    UNPARSEABLE, f"command could not be parsed ({src}); refusing to run it unchecked", text
                )
            return
        self.src_stack_push(src, quoted)
        try:
            for node in parsed:
                self.visit(node, depth, scope, self.stdin if depth == 0 else None)
        finally:
            self.src_stack_pop()

    def _parse(self, text: str) -> tuple[list[Any] | None, str, set[str]]:
        if "\x00" in text:
            return None, "contains a NUL byte", set()
        candidates = [text]
        rewritten, quoted = sp.unquote_heredoc_delimiters(text)
        rewritten = sp.rewrite_unsupported(rewritten)
        if rewritten != text:
            candidates.append(rewritten)
        err = ""
        for cand in candidates:
            try:
                return bashlex.parse(cand), cand, (quoted if cand is not text else set())
            except (
                bashlex.errors.ParsingError,
                NotImplementedError,
                AttributeError,
                IndexError,
                TypeError,
                ValueError,
                AssertionError,
                RecursionError,
            ) as exc:
                if not err:
                    err = f"{type(exc).__name__}: {exc}"
        return None, err, set()

    # -- source bookkeeping (node positions are relative to the parsed string) ------------

    _srcs: list[tuple[str, set[str]]]

    def src_stack_push(self, src: str, quoted: set[str]) -> None:
        if not hasattr(self, "_srcs"):
            self._srcs = []
        self._srcs.append((src, quoted))

    def src_stack_pop(self) -> None:
        self._srcs.pop()

    @property
    def src(self) -> str:
        return self._srcs[-1][0]

    def text_of(self, node: Any) -> str:
        pos = getattr(node, "pos", None)
        return self.src[pos[0] : pos[1]] if pos else ""

    # -- tree walk ---------------------------------------------------------------------

    def visit(self, node: Any, depth: int, scope: _Scope, stdin_text: str | None = None) -> None:
        kind = node.kind
        if kind == "command":
            self.visit_command(node, depth, scope, stdin_text)
        elif kind == "function":
            self.visit_function(node, depth, scope)
        elif kind == "pipeline":
            parts = [p for p in node.parts if p.kind not in ("pipe", "reservedword")]
            prev_text: str | None = stdin_text
            for p in parts:
                self.visit(p, depth, scope.copy(), prev_text)
                prev_text = self._static_stdout(p)
        elif kind == "list":
            for p in node.parts:
                if p.kind != "operator":
                    self.visit(p, depth, scope, stdin_text)
        elif kind == "compound":
            if self.policy.strict and spawn_loop(self.text_of(node), node):
                self.block("spawn-loop", "an endless loop starts background jobs", self.text_of(node))
            inner = (
                scope.copy()
                if node.list and node.list[0].kind == "reservedword" and node.list[0].word == "("
                else scope
            )
            for p in node.list:
                self.visit(p, depth, inner)
            redirects = getattr(node, "redirects", None) or []
            for r in redirects:
                self.visit(r, depth, scope)
            targets = [
                (r.type, self._word_value(r.output, scope) if hasattr(r.output, "word") else str(r.output))
                for r in redirects
                if r.kind == "redirect"
            ]
            if targets:  # "{ ...; } > /dev/sda", "while ...; done > /dev/vda"
                self.check_simple([], targets, self.text_of(node), depth, scope, None)
        elif kind in ("commandsubstitution", "processsubstitution"):
            self.visit(node.command, depth, scope.copy())
        elif kind == "redirect":
            self.visit_redirect_children(node, depth, scope)
        else:
            for child in self._children(node):
                self.visit(child, depth, scope)

    _children = staticmethod(children)

    def visit_redirect_children(self, node: Any, depth: int, scope: _Scope) -> None:
        out = getattr(node, "output", None)
        if out is not None and hasattr(out, "kind"):
            self.visit(out, depth, scope)
        hd = getattr(node, "heredoc", None)
        if hd is not None:
            delim = out.word if out is not None and hasattr(out, "word") else ""
            if delim not in self._srcs[-1][1]:
                for sub in sp.extract_substitutions(self._heredoc_body(hd)):
                    self.analyze(sub, depth + 1, scope.copy())

    @staticmethod
    def _heredoc_body(hd: Any) -> str:
        value = hd.value
        return value.rsplit("\n", 1)[0] if "\n" in value else ""

    def _word_value(self, w: Any, scope: _Scope) -> str:
        raw = self.text_of(w)
        # bashlex mis-unquotes words that mix quote styles ('a'"'"'b'), and does not decode
        # $'...': unquote the source text ourselves.
        value = sp.shell_unquote(raw) if raw else w.word
        if "$" in value:

            def sub(m: re.Match[str]) -> str:
                name = m.group(1) or m.group(2)
                return scope.env.get(name, m.group(0))

            value = _PARAM.sub(sub, value)
        if value == "~" or value.startswith("~/"):
            return value
        return value

    def _static_stdout(self, node: Any) -> str | None:
        """The text ``echo``/``printf`` with literal arguments writes, for ``... | sh``."""
        if node.kind != "command":
            return None
        words = [p.word for p in node.parts if p.kind == "word"]
        if not words:
            return None
        prog = posixpath.basename(words[0])
        if prog == "echo":
            args = words[1:]
            while args and re.fullmatch(r"-[neE]+", args[0]):
                args = args[1:]
            return " ".join(args)
        if prog == "printf" and len(words) > 1:
            return " ".join(words[1:]).replace("\\n", "\n")
        return None

    def visit_command(self, node: Any, depth: int, scope: _Scope, stdin_text: str | None) -> None:
        argv: list[str] = []
        redirects: list[tuple[str, str]] = []
        assignments: list[tuple[str, str]] = []
        for p in node.parts:
            if p.kind == "word":
                value = self._word_value(p, scope)
                raw = self.text_of(p)
                if "$" in raw and not any(q in raw for q in "\"'\\") and value.split() != [value]:
                    argv.extend(value.split())  # word splitting of an unquoted expansion
                else:
                    argv.append(value)
                for child in self._children(p):
                    self.visit(child, depth, scope)
            elif p.kind == "assignment":
                name, _, value = p.word.partition("=")
                assignments.append((name.rstrip("+"), value))
                for child in self._children(p):
                    self.visit(child, depth, scope)
            elif p.kind == "redirect":
                out = p.output
                target = self._word_value(out, scope) if hasattr(out, "word") else str(out)
                redirects.append((p.type, target))
                self.visit_redirect_children(p, depth, scope)
                if p.type in ("<<", "<<-") and getattr(p, "heredoc", None) is not None:
                    stdin_text = self._heredoc_body(p.heredoc)
                elif p.type == "<<<":
                    stdin_text = target
            else:
                self.visit(p, depth, scope)
        if not argv:
            for name, value in assignments:
                if "$(" not in value and "`" not in value:
                    scope.env[name] = value
        text = self.text_of(node)
        self.check_simple(argv, redirects, text, depth, scope, stdin_text)
        if argv and argv[0] == "cd":
            dest = argv[1] if len(argv) > 1 else "~"
            scope.cwd = resolve_path(dest, scope.cwd) if dest != "-" else None

    def check_simple(
        self,
        argv: list[str],
        redirects: list[tuple[str, str]],
        text: str,
        depth: int,
        scope: _Scope,
        stdin_text: str | None,
    ) -> None:
        if self.policy.allowed(text):
            return  # allow-listed: its own rules and unwrapping are skipped
        seen = 0
        while True:
            seen += 1
            if seen > 16:
                break
            cmd = SimpleCommand(list(argv), redirects, text, scope.cwd)
            for rule in self.policy.rules:
                # mypy reads a frozen dataclass field as writable, the Protocol's as read-only.
                reason = rule.check(cmd, self.policy)  # type: ignore[arg-type]
                if reason:
                    self.block(rule.name, reason, " ".join(argv) if text.strip() == "" else text)
            redirects = []  # checked once
            self._check_embedded(argv, depth, scope)
            un = unwrap(argv)
            if un is None:
                return
            if un.script is not None:
                self.analyze(un.script, depth + 1, scope.copy())
                return
            if un.stdin_shell:
                if stdin_text:
                    self.analyze(stdin_text, depth + 1, scope.copy())
                elif self.policy.strict and not any(op in ("<<", "<<-", "<<<") for op, _ in redirects):
                    self.block("shell-reads-stdin", "the shell's script is not visible to the guard", text)
                return
            assert un.argv is not None
            argv = un.argv
            text = " ".join(argv)
            # env/sudo VAR=value prefixes
            while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                argv = argv[1:]
            if not argv:
                return

    def _check_embedded(self, argv: list[str], depth: int, scope: _Scope) -> None:
        """Command strings and argv embedded in arguments: alias, trap, find -exec."""
        prog = posixpath.basename(argv[0]) if argv else ""
        args = argv[1:]
        if prog == "alias":
            for a in args:
                if "=" in a:
                    self.analyze(a.split("=", 1)[1], depth + 1, scope.copy())
        elif prog == "trap" and args and args[0] not in ("-", "-p", "-l", "--"):
            self.analyze(args[0], depth + 1, scope.copy())
        elif prog == "find":
            i = 0
            while i < len(args):
                if args[i] in ("-exec", "-execdir", "-ok", "-okdir"):
                    j = i + 1
                    while j < len(args) and args[j] not in (";", "+"):
                        j += 1
                    inner = args[i + 1 : j]
                    if inner:
                        if depth + 1 > self.policy.max_depth:
                            self.analyze("", depth + 1, scope)
                        self.check_simple(inner, [], " ".join(inner), depth + 1, scope.copy(), None)
                    i = j
                i += 1

    def visit_function(self, node: Any, depth: int, scope: _Scope) -> None:
        name = node.name.word if hasattr(node, "name") else node.parts[0].word
        body = node.body if hasattr(node, "body") else node.parts[-1]
        if self.policy.is_enabled("fork-bomb") and self_spawning(name, body):
            self.block(
                "fork-bomb", f"function {name!r} spawns copies of itself (fork bomb)", self.text_of(node)
            )
        self.visit(body, depth, scope.copy())


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

DEFAULT_POLICY = SafetyPolicy()


def check_command(cmd: str, policy: SafetyPolicy | None = None, stdin: bytes | None = None) -> Verdict | None:
    """Check one shell command string (and the ``stdin`` fed to it, read as a script when a
    shell reads it); return a :class:`Verdict` if it must be blocked."""
    if not isinstance(cmd, str):
        raise ValidationError(f"command must be a string, got {type(cmd).__name__}", field="command")
    text = stdin.decode("utf-8", "replace") if stdin else None
    return _Analyzer(policy or DEFAULT_POLICY, cmd, text).run()


class SafetyGuard(Callback):
    """Pre-run veto of destructive shell commands (see the module docstring).

    Args:
        policy: a :class:`SafetyPolicy`; keyword overrides below are applied on top.
        disabled_rules, protected_paths, denied_programs, allow_patterns, fail_closed,
        block_device_reads: shortcuts for the :class:`SafetyPolicy` fields.

    Raises :class:`smolvm.CommandBlockedError` from ``on_pre_run``; the message names the
    rule and the offending sub-command, and ``error.details`` carries ``rule``,
    ``reason`` and ``subcommand`` as well.
    """

    def __init__(self, policy: SafetyPolicy | None = None, **overrides: Any) -> None:
        base = policy or DEFAULT_POLICY
        if overrides:
            allowed = {f for f in SafetyPolicy.__dataclass_fields__ if not f.startswith("_")}
            bad = sorted(set(overrides) - allowed)
            if bad:
                raise ValidationError(f"unknown SafetyGuard option(s) {bad}", field=bad[0])
            base = replace(base, **overrides)
        self.policy = base

    def check(self, command: str, stdin: bytes | None = None) -> Verdict | None:
        return check_command(command, self.policy, stdin)

    def on_pre_run(self, ctx: RunContext) -> None:
        verdict = check_command(ctx.command, self.policy, ctx.stdin)
        if verdict is not None:
            err = CommandBlockedError(verdict.message, vm_id=ctx.vm_id, command=ctx.command)
            err.details.update(
                rule=verdict.rule,
                reason=verdict.reason,
                subcommand=verdict.subcommand,
                guard=type(self).__name__,
            )
            err.verdict = verdict
            raise err

    def on_pre_file(self, ctx: FileContext) -> None:
        """Uploads that would run on their own later (shell profiles, cron, init scripts,
        loader preloads, SSH keys, sudoers) are vetoed like ``echo ... > /etc/profile.d/x``."""
        if ctx.direction != "upload":
            return
        if (hit := startup_path(ctx.guest_path)) is not None:
            raise CommandBlockedError(
                f"upload to {ctx.guest_path} blocked by SafetyGuard (rule startup-file): files "
                f"under {hit} run code later, outside any command a guard sees",
                vm_id=ctx.vm_id,
                command=f"upload {ctx.guest_path}",
            )

    def __repr__(self) -> str:
        return f"SafetyGuard(policy={self.policy!r})"


__all__ = [
    "SafetyGuard",
    "SafetyPolicy",
    "Rule",
    "SimpleCommand",
    "Verdict",
    "check_command",
    "RULES",
    "BUILTIN_RULES",
    "DEFAULT_PROTECTED_PATHS",
    "DEFAULT_POLICY",
]
