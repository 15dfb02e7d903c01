"""What makes a guest *this* VM after a restore or resume: clock, entropy, hostname, SSH
keys, env vars — pushed through the guest agent (the guest read its config disk long ago,
in the VM a snapshot was taken from). Also the guest's env file format."""

from __future__ import annotations

import base64
import logging
import os
import shlex
from dataclasses import dataclass

from smolvm.exceptions import SmolVMError, SnapshotError
from smolvm.transports.agent import AgentTransport
from smolvm.transports.base import GUEST_ENV_FILE, ExecRequest, Transport
from smolvm.types import validate_env_key

log = logging.getLogger(__name__)

ENV_HEADER = "# Managed by SmolVM (set_env_vars). Sourced by login shells.\n"
GUEST_HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"


def env_file_text(env: dict[str, str]) -> str:
    """``/etc/profile.d/smolvm_env.sh``: one ``export KEY='value'`` per variable.

    Values are single-quoted (shlex.quote), so quotes, newlines and ``$(...)`` stay literal."""
    lines = [ENV_HEADER]
    for k in sorted(env):
        validate_env_key(k)
        lines.append(f"export {k}={shlex.quote(str(env[k]))}\n")
    return "".join(lines)


def read_guest_env(t: Transport) -> dict[str, str]:
    """The variables of the guest's env file (login shells load it)."""
    return parse_env_file(t.exec(ExecRequest(f"cat {GUEST_ENV_FILE} 2>/dev/null; true", "raw", 30)).stdout)


def write_guest_env(t: Transport, env: dict[str, str]) -> None:
    """Replace the guest's env file atomically with ``env``."""
    tmp = f"{GUEST_ENV_FILE}.tmp"
    cmd = f"cat > {tmp} && chmod 644 {tmp} && mv {tmp} {GUEST_ENV_FILE}"
    res = t.exec(ExecRequest(cmd, "raw", 30, stdin=env_file_text(env).encode()))
    if not res.ok:
        raise SmolVMError(f"writing {GUEST_ENV_FILE} failed: {res.stderr.strip()}")


def put_env_file(t: AgentTransport, env: dict[str, str]) -> None:
    """Replace the guest's env file with ``env`` through the agent's atomic file write (no
    guest process: a restored or resumed guest's first command comes sooner)."""
    t.write_file(GUEST_ENV_FILE, env_file_text(env).encode(), 0o644)


def parse_env_file(text: str) -> dict[str, str]:
    """Inverse of :func:`env_file_text` (parsed with shlex, never executed)."""
    out: dict[str, str] = {}
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    for tok in lex:
        if tok == "export":
            continue
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


_IDENTITY_BG = (
    '(umask 077; mkdir -p /etc/dropbear /root/.ssh; printf %s "$SMOLVM_HOSTKEY" | base64 -d > '
    + GUEST_HOST_KEY
    + ".new && mv "
    + GUEST_HOST_KEY
    + ".new "
    + GUEST_HOST_KEY
    + "; "
    '[ -n "$SMOLVM_AUTHKEYS" ] && printf "%s\\n" "$SMOLVM_AUTHKEYS" > /root/.ssh/authorized_keys); '
    'printf "%s\\n" "$SMOLVM_HOSTNAME" > /etc/hostname; '
    'printf "127.0.0.1 localhost\\n127.0.1.1 %s\\n" "$SMOLVM_HOSTNAME" > /etc/hosts; '
    "[ -x /usr/sbin/dropbear ] || exit 0; "
    "for p in $old; do while kill -0 $p 2>/dev/null; do usleep 2000; done; done; "
    "pw=-s; [ -f /etc/smolvm/password-auth ] && pw=; "
    # The SSH server goes to its own cgroup, not this command's session group ($$ would
    # be the parent shell in a subshell: /proc/self is this process).
    "read -r me _ < /proc/self/stat; echo $me > /sys/fs/cgroup/smolvm-ssh/cgroup.procs 2>/dev/null; "
    # Background work runs at nice 19; the SSH server and its sessions run at the default.
    "renice 0 -p $me >/dev/null 2>&1; "  # absolute: busybox -n adds
    "/usr/sbin/dropbear -r " + GUEST_HOST_KEY + " -p 22 $pw"
)
#: The identity work a restored guest does in the background (spawned at nice 19, not
#: waited for): its new host key, authorized_keys, /etc/hostname and /etc/hosts, then SSH.
IDENTITY_BACKGROUND = "exec </dev/null >/dev/null 2>&1; " + _IDENTITY_BG
_SETTLE = (
    "; i=0; while [ $i -lt 500 ] && ! grep -q ':0016 00000000:0000 0A' /proc/net/tcp "
    "/proc/net/tcp6 2>/dev/null; do usleep 10000; i=$((i+1)); done"
)

#: Stop every dropbear with shell builtins only (no fork/exec: each costs ~10-50 ms on a
#: freshly restored TCG guest, whose translation cache is empty). Leaves their pids in $old.
KILL_SSHD = (
    "old=; for d in /proc/[0-9]*; do read -r c < $d/comm 2>/dev/null && "
    '[ "$c" = dropbear ] && old="$old ${d#/proc/}"; done; [ -n "$old" ] && kill $old; '
)
#: KILL_SSHD, then wait until they are gone.
STOP_SSHD = KILL_SSHD + "for p in $old; do while kill -0 $p 2>/dev/null; do usleep 2000; done; done; true"


def identity_script(settle: bool, env_file: bool, sshd_running: bool = True) -> str:
    """One guest command that makes a restored guest this VM.

    An SSH server left running by the snapshot (its host key and authorized_keys belong to
    the source) is stopped at once; image snapshots are taken with it stopped. The env
    file is written before the command returns. The new host key, authorized_keys,
    /etc/hostname, /etc/hosts and the SSH server start follow in the background, a second
    later and at the lowest priority, so a first command does not compete with them —
    unless ``settle``, which does it all before returning and waits for port 22."""
    head = KILL_SSHD if sshd_running else ""
    if env_file:
        head += f'printf %s "$SMOLVM_ENVFILE" > {GUEST_ENV_FILE}; '
    if settle:
        return head + "{ " + _IDENTITY_BG + _SETTLE + "; } </dev/null >/dev/null 2>&1; true"
    return (
        head
        + "( sleep 1; read -r me _ < /proc/self/stat; renice -n 19 -p $me; "
        + _IDENTITY_BG
        + " ) </dev/null >/dev/null 2>&1 & true"
    )


@dataclass(frozen=True)
class Identity:
    """Who a guest must become: its hostname, SSH host key (dropbear format), the client
    key it trusts and its env vars."""

    hostname: str
    host_key: bytes
    authorized_keys: str
    env_vars: dict[str, str]


@dataclass(frozen=True)
class GuestState:
    """What the guest already has from its snapshot (None: unknown, push everything)."""

    authorized_keys: str | None = None
    env_vars: dict[str, str] | None = None
    sshd_running: bool = True


def push_identity(
    t: AgentTransport, who: Identity, have: GuestState | None = None, *, settle: bool = False
) -> None:
    """Make a restored guest ``who``: clock, entropy, hostname, SSH keys, env vars.

    Control ops, a file write and a background command: under TCG every guest code path runs
    through the translator the first time, so the first command must not wait for a
    process of ours. Only an SSH server left running by the snapshot (stopped at once) or
    ``settle`` take the slower way: one command the host waits for."""
    have = have or GuestState()
    refresh_clock_and_entropy(t)
    t.set_hostname(who.hostname)
    env = {"SMOLVM_HOSTKEY": base64.b64encode(who.host_key).decode(), "SMOLVM_HOSTNAME": who.hostname}
    if have.authorized_keys != who.authorized_keys:
        env["SMOLVM_AUTHKEYS"] = who.authorized_keys
    write_env = have.env_vars is None or who.env_vars != have.env_vars
    if not settle and not have.sshd_running:
        if write_env:  # before the first command, which sources it
            put_env_file(t, who.env_vars)
        # nice 19: it yields to the user's first commands.
        bg = ExecRequest(
            IDENTITY_BACKGROUND, "raw", None, env=env, detach=True, host_work=True, low_priority=True
        )
        t.spawn(bg).forget()
        return
    if write_env:
        env["SMOLVM_ENVFILE"] = env_file_text(who.env_vars)
    script = identity_script(settle, write_env, have.sshd_running)
    res = t.exec(ExecRequest(script, "raw", 30, env=env, host_work=True))
    if not res.ok:
        raise SnapshotError(
            f"VM {who.hostname}: setting the clone's identity failed "
            f"(exit {res.exit_code}): {res.stderr.strip()[-300:]}"
        )


def refresh_clock_and_entropy(t: AgentTransport) -> None:
    """After a resume: set the guest clock and reseed its RNG."""
    t.sync_time()
    t.add_entropy(os.urandom(64))
