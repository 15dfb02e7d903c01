"""Wrapper commands (sudo, env, nice, timeout, xargs, busybox, ...) and nested shells:
what command or command string an argv really runs."""

from __future__ import annotations

import posixpath
import re

# --------------------------------------------------------------------------------------
# Wrappers and nested shells
# --------------------------------------------------------------------------------------

_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "hush", "rbash", "lksh", "posh", "yash"}
_WRAPPER_OPTS: dict[str, set[str]] = {
    "sudo": {
        "-u",
        "-g",
        "-h",
        "-p",
        "-C",
        "-r",
        "-t",
        "-U",
        "-T",
        "-D",
        "--user",
        "--group",
        "--host",
        "--prompt",
        "--close-from",
        "--role",
        "--type",
        "--other-user",
        "--command-timeout",
        "--chdir",
    },
    "doas": {"-u", "-C"},
    "nice": {"-n", "--adjustment"},
    "ionice": {"-c", "-n", "-p", "-P", "-u", "--class", "--classdata"},
    "stdbuf": {"-i", "-o", "-e", "--input", "--output", "--error"},
    "setsid": set(),
    "nohup": set(),
    "command": set(),
    "builtin": set(),
    "exec": {"-a"},
    "time": {"-f", "-o", "--format", "--output"},
    "chrt": set(),
    "unbuffer": set(),
    "catchsegv": set(),
    "fakeroot": set(),
    "flock": {"-w", "-E", "--timeout", "--conflict-exit-code"},
    "runuser": {"-u", "-g", "-G", "--user", "--group"},
    "torsocks": set(),
    "proxychains": set(),
    "strace": {"-e", "-o", "-p", "-s", "-u", "-E"},
    "ltrace": {"-e", "-o", "-p", "-s", "-u"},
    "unshare": set(),
    "nsenter": {"-t", "--target"},
    "taskset": set(),
    "systemd-run": {"-p", "--property", "-u", "--unit", "--uid", "--gid", "-E", "--setenv"},
}


class _Unwrapped:
    def __init__(
        self, argv: list[str] | None = None, script: str | None = None, stdin_shell: bool = False
    ) -> None:
        self.argv = argv
        self.script = script
        self.stdin_shell = stdin_shell


def _shell_script_arg(args: list[str]) -> _Unwrapped | None:
    """For ``bash [opts] -c STRING``: the string; for ``bash`` reading stdin: a marker."""
    i = 0
    has_c = False
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if a.startswith("--"):
            i += 1
            continue
        if a.startswith(("-", "+")) and len(a) > 1:
            if "c" in a[1:]:
                has_c = True
            i += 1
            continue
        break
    rest = args[i:]
    if has_c:
        return _Unwrapped(script=rest[0] if rest else "")
    if not rest or rest[0] == "-" or "-s" in args:
        return _Unwrapped(stdin_shell=True)
    return None  # runs a script file


def unwrap(argv: list[str]) -> _Unwrapped | None:
    """If ``argv`` runs another command, what it runs."""
    if not argv:
        return None
    prog = posixpath.basename(argv[0])
    args = argv[1:]
    if prog in _SHELLS:
        return _shell_script_arg(args)
    if prog == "busybox":
        return _Unwrapped(argv=args) if args and not args[0].startswith("-") else None
    if prog == "eval":
        return _Unwrapped(script=" ".join(args))
    if prog in ("su", "sux"):
        for i, a in enumerate(args):
            if a in ("-c", "--command") and i + 1 < len(args):
                return _Unwrapped(script=args[i + 1])
            if a.startswith("--command="):
                return _Unwrapped(script=a.split("=", 1)[1])
        return None
    if prog == "watch":
        i = 0
        while i < len(args) and args[i].startswith("-"):
            i += (
                2
                if args[i] in ("-n", "--interval", "-d", "-q", "--equexit")
                and "=" not in args[i]
                and args[i] not in ("-d",)
                else 1
            )
        return _Unwrapped(script=" ".join(args[i:])) if args[i:] else None
    if prog == "env":
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-u", "--unset", "-C", "--chdir"):
                i += 2
                continue
            if a in ("-S", "--split-string"):
                return _Unwrapped(script=" ".join(args[i + 1 :]))
            if a.startswith(("--split-string=", "-S")) and a not in ("-S",):
                return _Unwrapped(
                    script=a.split("=", 1)[1] if a.startswith("--") else a[2:] + " " + " ".join(args[i + 1 :])
                )
            if a.startswith("-") or re.match(r"^[A-Za-z_]\w*=", a):
                i += 1
                continue
            break
        return _Unwrapped(argv=args[i:]) if args[i:] else None
    if prog == "timeout":
        i = 0
        while i < len(args) and args[i].startswith("-"):
            i += 2 if args[i] in ("-s", "-k", "--signal", "--kill-after") else 1
        return _Unwrapped(argv=args[i + 1 :]) if len(args) > i + 1 else None
    if prog == "xargs":
        i = 0
        with_val = {
            "-a",
            "-d",
            "-E",
            "-I",
            "-L",
            "-n",
            "-P",
            "-s",
            "--arg-file",
            "--delimiter",
            "--max-lines",
            "--max-args",
            "--max-procs",
            "--max-chars",
            "--process-slot-var",
        }
        while i < len(args) and args[i].startswith("-"):
            a = args[i]
            i += 2 if a in with_val else 1
        return _Unwrapped(argv=args[i:]) if args[i:] else None
    if prog in ("chroot",):
        ops = [a for a in args if not a.startswith("-")]
        return _Unwrapped(argv=ops[1:]) if len(ops) > 1 else None
    if prog == "taskset":
        i = 0
        while i < len(args) and args[i].startswith("-"):
            i += 1
        return _Unwrapped(argv=args[i + 1 :]) if len(args) > i + 1 else None
    if prog == "chrt":
        ops_i = 0
        while ops_i < len(args) and args[ops_i].startswith("-"):
            ops_i += 1
        return _Unwrapped(argv=args[ops_i + 1 :]) if len(args) > ops_i + 1 else None
    if prog == "flock":
        for i, a in enumerate(args):
            if a in ("-c", "--command") and i + 1 < len(args):
                return _Unwrapped(script=args[i + 1])
    if prog == "command" and args and args[0] in ("-v", "-V"):
        return None
    if prog in _WRAPPER_OPTS:
        with_val = _WRAPPER_OPTS[prog]
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                i += 1
                break
            if prog == "nice" and re.match(r"^-\d+$", a):
                i += 1
                continue
            if a.startswith("-") and len(a) > 1:
                i += 2 if (a in with_val) else 1
                continue
            if prog in ("sudo", "doas", "runuser", "systemd-run") and re.match(r"^[A-Za-z_]\w*=", a):
                i += 1
                continue
            break
        rest = args[i:]
        if prog == "flock" and rest:
            rest = rest[1:]  # lock file
        if prog in ("sudo", "doas") and not rest and ({"-s", "-i"} & set(args)):
            return _Unwrapped(stdin_shell=True)
        return _Unwrapped(argv=rest) if rest else None
    return None
