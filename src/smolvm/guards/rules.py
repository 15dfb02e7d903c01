"""Built-in SafetyGuard rules and the helpers they share (paths, devices, options).

Each rule is a :class:`Rule`: a name, a description and a ``check(cmd, policy)`` function
that receives one :class:`SimpleCommand` (wrappers such as ``sudo`` already peeled off) and
returns a reason string when the command must be blocked.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from smolvm.guards import shellparse as sp


class SafetyPolicy(Protocol):
    """What rules read from a policy (:class:`smolvm.guards.safety.SafetyPolicy`)."""

    denied_programs: frozenset[str]
    block_device_reads: bool

    @property
    def protected_norm(self) -> tuple[str, ...]: ...


@dataclass
class SimpleCommand:
    """One simple command as a rule sees it.

    Attributes:
        argv: the words, unquoted (``$VAR`` left as text unless assigned earlier in the
            same command line; ``$HOME`` and ``~`` become ``~``).
        program: ``basename(argv[0])`` or ``""`` for assignments/redirections only.
        redirects: ``(operator, target)`` pairs, e.g. ``(">", "/dev/sda")``.
        text: the source text of this command.
        cwd: directory set by a preceding ``cd`` in the same list, if known.
    """

    argv: list[str]
    redirects: list[tuple[str, str]]
    text: str
    cwd: str | None = None

    @property
    def program(self) -> str:
        return posixpath.basename(self.argv[0]) if self.argv else ""

    @property
    def args(self) -> list[str]:
        return self.argv[1:]


RuleCheck = Callable[[SimpleCommand, "SafetyPolicy"], "str | None"]


@dataclass(frozen=True)
class Rule:
    """A named check run on every simple command. ``check`` returns a reason or None."""

    name: str
    description: str
    check: RuleCheck


#: Paths whose deletion (or recursive chmod/chown) is blocked; their ancestors too.
DEFAULT_PROTECTED_PATHS: tuple[str, ...] = (
    "/",
    "~",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/sbin",
    "/usr/share",
    "/var",
    "/var/lib",
)

UNPARSEABLE = "unparseable"


# --------------------------------------------------------------------------------------
# Path helpers
# --------------------------------------------------------------------------------------

_GLOB_CHARS = set("*?[")


def normpath(p: str) -> str:
    if p in ("~", "$HOME", "${HOME}"):
        return "~"
    for pre in ("~/", "$HOME/", "${HOME}/"):
        if p.startswith(pre):
            rest = posixpath.normpath("/" + p[len(pre) :])
            return "~" if rest == "/" else "~" + rest
    if p.startswith("~root"):
        p = "/root" + p[5:]
    if p.startswith("/"):
        p = re.sub(r"^/+", "/", p)
        p = posixpath.normpath(p)
        p = re.sub(r"^/+", "/", p)
    return p


def resolve_path(target: str, cwd: str | None) -> str | None:
    """Normalised absolute (or ``~``-rooted) form of ``target``, or None if unknown."""
    if not target:
        return None
    if target.startswith(("/", "~", "$HOME", "${HOME}")):
        return normpath(target)
    if cwd is None or "$" in target:
        return None
    return normpath(cwd.rstrip("/") + "/" + target) if cwd != "~" else normpath("~/" + target)


def _is_under(path: str, root: str) -> bool:
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def _protected_hit(target: str, cwd: str | None, policy: SafetyPolicy) -> str | None:
    """The protected path ``target`` would destroy, if any."""
    for word in sp.expand_braces(target):
        path = resolve_path(word, cwd)
        if path is None:
            continue
        prot = policy.protected_norm
        if any(c in path for c in _GLOB_CHARS):
            head, tail = posixpath.split(path)
            # "P/*", "P/.*", "P/.[!.]*": the whole contents of P
            if tail and set(tail) <= set("*?.[]!") and "*" in tail:
                base = normpath(head or "/")
                if base in prot or any(_is_under(p, base) for p in prot):
                    return base
            for p in prot:
                if fnmatch.fnmatchcase(p, path) or fnmatch.fnmatchcase(p + "/", path):
                    return p
            continue
        for p in prot:
            if path == p or _is_under(p, path):
                return p
    return None


_SAFE_DEVICES = re.compile(
    r"^/dev/(null|zero|full|u?random|tty\w*|pts/.*|stdin|stdout|stderr|fd/.*|console|ptmx|shm/.*|mqueue/.*|log)$"
)
_BLOCK_DEVICE = re.compile(
    r"^/dev/("
    r"[shv]d[a-z]+\d*|xvd[a-z]+\d*|nvme\d+(n\d+(p\d+)?)?|mmcblk\d+(p\d+|boot\d+|rpmb)?|"
    r"loop\d+|dm-\d+|md\d+|sr\d+|nbd\d+|ram\d+|zram\d+|ubd[a-z]+\d*|vport\w*|"
    r"mapper/.+|disk/.+|root|mem|kmem|port|sg\d+|block/.+|[a-z]+/[a-z0-9_-]+"
    r")$"
)
_DEVICE_SAMPLES = (
    "/dev/sda",
    "/dev/sda1",
    "/dev/vda",
    "/dev/vda1",
    "/dev/hda",
    "/dev/xvda",
    "/dev/nvme0n1",
    "/dev/mmcblk0",
    "/dev/dm-0",
    "/dev/md0",
    "/dev/mem",
)


def _is_block_device(path: str) -> bool:
    if path.startswith("/proc/") and normpath(path) == "/proc/sysrq-trigger":
        return True  # writing it reboots or crashes the kernel
    if not path.startswith("/dev/"):
        return False
    path = normpath(path)
    if _SAFE_DEVICES.match(path):
        return False
    if any(c in path for c in _GLOB_CHARS):
        return any(fnmatch.fnmatchcase(d, path) for d in _DEVICE_SAMPLES)
    return bool(_BLOCK_DEVICE.match(path))


# --------------------------------------------------------------------------------------
# Option parsing helpers
# --------------------------------------------------------------------------------------


def _split_opts(args: list[str], with_value: Iterable[str] = ()) -> tuple[set[str], list[str]]:
    """Split GNU-style arguments into (flags, operands). Short flag clusters are exploded."""
    with_value = set(with_value)
    flags: set[str] = set()
    operands: list[str] = []
    it = iter(range(len(args)))
    skip = False
    end = False
    for i in it:
        a = args[i]
        if skip:
            skip = False
            continue
        if end or a == "-" or not a.startswith("-"):
            operands.append(a)
            continue
        if a == "--":
            end = True
            continue
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            flags.add(name)
            if name in with_value and "=" not in a:
                skip = True
            continue
        for k, ch in enumerate(a[1:]):
            flags.add("-" + ch)
            if "-" + ch in with_value:
                if k == len(a) - 2:
                    skip = True
                break
    return flags, operands


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------

_FORMAT_PROGRAMS = re.compile(
    r"^(mkfs(\.\w+)?|mke2fs|mkdosfs|mkntfs|mkexfatfs|mkreiserfs|mkswap|mkfs\w*|wipefs)$"
)
_PARTITION_PROGRAMS = {"fdisk", "sfdisk", "cfdisk", "gdisk", "sgdisk", "parted", "blkdiscard", "badblocks"}


def _rule_recursive_delete(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    prog = cmd.program
    if prog == "rm":
        flags, operands = _split_opts(cmd.args)
        recursive = bool(flags & {"-r", "-R", "--recursive"})
        for t in operands:
            hit = _protected_hit(t, cmd.cwd, policy)
            if hit is None:
                continue
            path = resolve_path(t, cmd.cwd) or t
            if recursive or any(c in path for c in _GLOB_CHARS):
                return f"recursive delete of protected path {hit!r} (target {t!r})"
        return None
    if prog == "find":
        # find ROOT... -delete | -exec rm ...
        starts = []
        for a in cmd.args:
            if a.startswith(("-", "(", "!")):
                break
            starts.append(a)
        deletes = "-delete" in cmd.args or any(
            a in ("-exec", "-execdir", "-ok", "-okdir")
            and i + 1 < len(cmd.args)
            and posixpath.basename(cmd.args[i + 1]) in ("rm", "shred", "unlink")
            for i, a in enumerate(cmd.args)
        )
        if deletes:
            for s in starts:
                found = resolve_path(s, cmd.cwd)
                if found is None:
                    continue
                path = found
                prot = policy.protected_norm
                for p in prot:
                    if path == p or _is_under(p, path):
                        return f"find deletes under protected path {p!r} (start {s!r})"
    return None


def _rule_filesystem_format(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    if _FORMAT_PROGRAMS.match(cmd.program):
        return f"{cmd.program} creates or wipes a filesystem"
    return None


def _rule_block_device_write(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    for op, target in cmd.redirects:
        if op in (">", ">>", ">|", "<>", "&>", "&>>", ">&") and _is_block_device(target):
            return f"redirection {op} writes to block device {target!r}"
        if policy.block_device_reads and op in ("<", "<>") and _is_block_device(target):
            return f"reads block device {target!r}"
    prog, args = cmd.program, cmd.args
    if prog == "dd":
        for a in args:
            if a.startswith("of=") and _is_block_device(a[3:]):
                return f"dd writes to block device {a[3:]!r}"
            if policy.block_device_reads and a.startswith("if=") and _is_block_device(a[3:]):
                return f"dd reads block device {a[3:]!r}"
        return None
    devices = [a for a in args if _is_block_device(a)]
    if prog == "shred":
        if devices:
            return f"shred overwrites block device {devices[0]!r}"
        return None
    if prog in _PARTITION_PROGRAMS and devices:
        flags, operands = _split_opts(args)
        read_only = (
            flags
            & {
                "-l",
                "--list",
                "-d",
                "--dump",
                "-p",
                "--print",
                "-s",
                "--show-size",
                "-V",
                "--verify",
                "-h",
                "--help",
            }
            or "print" in operands
        )
        if prog == "badblocks":
            read_only = not (flags & {"-w", "-n"})
        if not read_only:
            return f"{prog} modifies the partition table or contents of {devices[0]!r}"
        return None
    if prog == "tee" and devices:
        return f"tee writes to block device {devices[0]!r}"
    if prog in ("cp", "install", "mv", "pv", "ddrescue", "cat") and devices:
        _flags, operands = _split_opts(
            args,
            ("-t", "--target-directory", "-S", "--suffix", "-m", "--mode", "-o", "--owner", "-g", "--group"),
        )
        if prog in ("cp", "install", "mv", "ddrescue") and operands and _is_block_device(operands[-1]):
            return f"{prog} writes to block device {operands[-1]!r}"
    if policy.block_device_reads and devices:
        return f"{prog} accesses block device {devices[0]!r}"
    return None


def _rule_recursive_permissions(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    if cmd.program not in ("chmod", "chown", "chgrp", "setfacl", "chattr"):
        return None
    flags, operands = _split_opts(cmd.args, ("--reference",))
    recursive = bool(flags & {"-R", "--recursive"})
    if not recursive:
        return None
    targets = operands[1:] if cmd.program in ("chmod", "chown", "chgrp", "chattr") else operands
    if cmd.program == "chmod" and any(f.startswith("--reference") for f in flags):
        targets = operands
    for t in targets:
        hit = _protected_hit(t, cmd.cwd, policy)
        if hit is not None:
            return f"recursive {cmd.program} on protected path {hit!r} (target {t!r})"
    return None


def _rule_denied_program(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    if cmd.program and cmd.program in policy.denied_programs:
        return f"program {cmd.program!r} is denied by policy"
    return None


def _rule_fork_bomb(cmd: SimpleCommand, policy: SafetyPolicy) -> str | None:
    return None  # detected structurally on function definitions (see _Analyzer)


BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "recursive-delete",
        "rm -r / find -delete of a protected path, its ancestors or its whole contents",
        _rule_recursive_delete,
    ),
    Rule("filesystem-format", "mkfs, mkfs.*, mke2fs, mkswap, wipefs and friends", _rule_filesystem_format),
    Rule("fork-bomb", "a function that calls itself in a pipeline or in the background", _rule_fork_bomb),
    Rule(
        "block-device-write",
        "dd of=/dev/..., > /dev/sda (also on { }, loops, subshells), shred /dev/..., "
        "partitioning tools, tee/cp onto devices, /proc/sysrq-trigger",
        _rule_block_device_write,
    ),
    Rule("recursive-permissions", "chmod/chown/chgrp -R on a protected path", _rule_recursive_permissions),
    Rule("denied-program", "programs listed in SafetyPolicy.denied_programs", _rule_denied_program),
)

#: Rule name → description, including ``unparseable`` (the parse-failure policy).
RULES: dict[str, str] = {r.name: r.description for r in BUILTIN_RULES}
RULES[UNPARSEABLE] = "the command could not be parsed (only when fail_closed)"


#: Guest paths an upload may not write (files there run code later, unseen by guards).
STARTUP_PATHS = (
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/environment",
    "/root/.bashrc",
    "/root/.profile",
    "/root/.bash_profile",
    "/root/.ssh",
    "/etc/cron.d",
    "/etc/crontab",
    "/var/spool/cron",
    "/etc/init.d",
    "/etc/rc.local",
    "/etc/systemd",
    "/etc/ld.so.preload",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/usr/lib/smolvm",
    "/sbin/init",
    "/init",
)


def startup_path(path: str) -> str | None:
    """The entry of :data:`STARTUP_PATHS` that guest ``path`` is or lies under, if any."""
    norm = posixpath.normpath(path)
    return next((p for p in STARTUP_PATHS if norm == p or norm.startswith(p + "/")), None)


__all__ = [
    "SimpleCommand",
    "Rule",
    "BUILTIN_RULES",
    "RULES",
    "DEFAULT_PROTECTED_PATHS",
    "UNPARSEABLE",
    "STARTUP_PATHS",
    "startup_path",
]
