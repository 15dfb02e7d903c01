"""Public data types: configuration (validated by pydantic), VM state and results."""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from smolvm.exceptions import ValidationError

VM_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")  # \Z: no trailing newline
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Kernel arguments used when a config gives none: serial console, reboot at once on a
#: panic by triple fault (QEMU runs with -no-reboot, so the VMM exits and the host marks
#: the VM ERROR within tens of milliseconds; reboot=k would first probe for a keyboard
#: controller microvm lacks, ~1.4 s), and our init (which starts the SSH server and agent).
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=t panic=-1 pci=off init=/init"


class VMState(str, Enum):  # noqa: UP042 - str() of members is public behaviour; StrEnum changes it
    """Lifecycle state of a VM as recorded in the state store."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"

    def __str__(self) -> str:  # "running", not "VMState.RUNNING", in CLI tables
        return self.value


def _new_vm_id() -> str:
    return "vm-" + secrets.token_hex(4)


class _Model(BaseModel):
    """Base for validated models: pydantic errors become SmolVM ``ValidationError``s."""

    # Validators are built on first use, not at `import smolvm` (~30 ms of it: P6).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise _to_validation_error(type(self).__name__, exc) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except pydantic.ValidationError as exc:
            raise _to_validation_error(type(self).__name__, exc) from None


def _to_validation_error(model: str, exc: pydantic.ValidationError) -> ValidationError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or None
    msg = err.get("msg", "invalid value")
    value = err.get("input")
    text = f"{model}.{loc}: {msg} (got {value!r})" if loc else f"{model}: {msg}"
    return ValidationError(text, field=loc, details={"errors": len(exc.errors())})


class Limits(_Model):
    """Caps for one command session (its own cgroup in the guest; agent channel). None
    keeps the default: 512 processes, 3/4 of the memory commands may use (the VM's memory
    minus 64 MiB for the kernel, agent and init), CPU weight 100 among sessions — all
    sessions together run at a low weight below the agent's.

    Attributes:
        pids: most processes and threads at once (a fork beyond fails with EAGAIN).
        memory_mib: memory in MiB; beyond it the kernel OOM-kills in this session only
            (the command typically exits 137).
        cpu_weight: 1-10000, relative to other sessions.
    """

    pids: int | None = Field(default=None, ge=1, le=1_000_000)
    memory_mib: int | None = Field(default=None, ge=16, le=1024 * 1024)
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)


#: Guest paths a workspace mount may not cover (the system and SmolVM's own files).
_RESERVED_GUEST_PATHS = (
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
    "/var",
    "/tmp",
)
_GUEST_PATH_RE = re.compile(r"\A(/[A-Za-z0-9._-]+)+\Z")
MAX_WORKSPACE_MOUNTS = 8


class WorkspaceMount(_Model):
    """A host directory shared into the guest (virtio-9p).

    ``writable=False`` (default): the guest sees the host files through a writable overlay
    whose changes stay inside the VM; the host directory is never written. ``True``: the
    guest's writes go through to the host directory (files it creates get safe host modes:
    no setuid/setgid bits, owner-only permissions).
    """

    host_path: Path
    guest_path: str
    writable: bool = False

    @field_validator("host_path")
    @classmethod
    def _check_host(cls, v: Path) -> Path:
        p = Path(v).expanduser()
        if p.is_symlink():
            raise ValueError(f"host path {p} is a symlink: give the directory it points to")
        if not p.is_dir():
            raise ValueError(f"host path {p} is not an existing directory")
        return p.resolve()

    @field_validator("guest_path")
    @classmethod
    def _check_guest(cls, v: str) -> str:
        if len(v) > 200 or not _GUEST_PATH_RE.match(v) or any(part in (".", "..") for part in v.split("/")):
            raise ValueError(
                f"guest path {v!r} must be absolute, made of letters, digits, '.', '_', '-' and '/' "
                "(no '..'), at most 200 characters"
            )
        v = v.rstrip("/")
        for r in _RESERVED_GUEST_PATHS:
            if v == r or (r != "/" and r in ("/proc", "/sys", "/dev", "/run") and v.startswith(r + "/")):
                raise ValueError(f"guest path {v!r} would cover {r}: pick e.g. /workspace or /mnt/data")
        return v

    @classmethod
    def parse(cls, spec: str, *, writable: bool = False) -> WorkspaceMount:
        """``"HOST:GUEST"`` (or ``"HOST:GUEST:rw"`` / ``":ro"``) as in ``SmolVM(mounts=[...])``."""
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.rsplit(":", 1)
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(host_path=Path(parts[0]), guest_path=parts[1], writable=parts[2] == "rw")
        if len(parts) == 2 and parts[0] and parts[1]:
            return cls(host_path=Path(parts[0]), guest_path=parts[1], writable=writable)
        raise ValidationError(
            f"mount {spec!r}: use HOST_DIR:GUEST_PATH (optionally :ro or :rw), e.g. ./repo:/workspace",
            field="mounts",
        )


_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_POLICY_ENTRIES = 256


class InternetSettings(_Model):
    """What a sandbox may reach on the network, enforced by the host (never the guest).

    Whatever the settings, a guest never reaches the host itself (its loopback or any of
    its addresses), other sandboxes, link-local addresses (cloud metadata) or private and
    shared ranges, unless ``allowed_cidrs`` names a range explicitly.

    - ``allowed_domains``: ``["*"]`` (default) is the public internet; ``[]`` is no egress
      at all. A list of names (``"pypi.org"``, ``"*.example.com"``) allows exactly those
      names over HTTP (port 80) and HTTPS (port 443), checked by the host against the HTTP
      ``Host`` header and the TLS SNI; nothing else leaves the sandbox.
    - ``allowed_cidrs``: extra IP ranges the guest may reach on any port (also private ones,
      e.g. ``"10.1.2.0/24"`` for a company mirror).
    - ``dns_servers``: the resolvers the host side uses for the guest's DNS (default: the
      host's own resolver, reached through the uplink).
    """

    allowed_domains: list[str] = Field(default_factory=lambda: ["*"])
    allowed_cidrs: list[str] = Field(default_factory=list)
    dns_servers: list[str] = Field(default_factory=list)

    @field_validator("allowed_domains")
    @classmethod
    def _check_domains(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_POLICY_ENTRIES:
            raise ValueError(f"at most {MAX_POLICY_ENTRIES} allowed_domains, got {len(v)}")
        out: list[str] = []
        for d in v:
            name = str(d).strip().lower().rstrip(".")
            if name == "*":
                if len(v) != 1:
                    raise ValueError('"*" (the public internet) cannot be combined with names')
            elif len(name) > 253 or not _DOMAIN_RE.match(name):
                raise ValueError(
                    f"allowed_domains entry {d!r} is not a host name: use names like "
                    '"pypi.org" or "*.example.com", "*" alone for the public internet, [] for none'
                )
            if name not in out:
                out.append(name)
        return out

    @field_validator("allowed_cidrs")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_POLICY_ENTRIES:
            raise ValueError(f"at most {MAX_POLICY_ENTRIES} allowed_cidrs, got {len(v)}")
        out = []
        for c in v:
            try:
                out.append(str(ipaddress.ip_network(str(c).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"allowed_cidrs entry {c!r} is not an IP range like 10.1.2.0/24") from None
        return out

    @field_validator("dns_servers")
    @classmethod
    def _check_dns(cls, v: list[str]) -> list[str]:
        if len(v) > 3:
            raise ValueError(f"at most 3 dns_servers (resolv.conf's limit), got {len(v)}")
        out = []
        for a in v:
            try:
                out.append(str(ipaddress.ip_address(str(a).strip())))
            except ValueError:
                raise ValueError(f"dns_servers entry {a!r} is not an IP address") from None
        return out

    @property
    def internet(self) -> bool:
        """Any egress at all."""
        return bool(self.allowed_domains or self.allowed_cidrs)

    @property
    def open_internet(self) -> bool:
        """``allowed_domains == ["*"]``: any public address."""
        return self.allowed_domains == ["*"]

    @property
    def domains(self) -> list[str]:
        """The named domains (empty for ``["*"]`` and ``[]``)."""
        return [d for d in self.allowed_domains if d != "*"]


class VMConfig(_Model):
    """Configuration of one microVM.

    Sizes are in MiB, times in seconds. ``kernel_path``/``rootfs_path`` default to the
    image built by :class:`smolvm.ImageBuilder` when left unset.
    """

    vm_id: str = Field(default_factory=_new_vm_id)
    vcpu_count: int = Field(default=1, ge=1, le=64)
    mem_size_mib: int = Field(default=512, ge=128, le=65536)
    disk_size_mib: int | None = Field(default=None, ge=64, le=1024 * 1024)
    kernel_path: Path | None = None
    rootfs_path: Path | None = None
    initrd_path: Path | None = None
    boot_args: str = DEFAULT_BOOT_ARGS
    backend: Literal["auto", "qemu", "firecracker"] | None = None
    #: "user": rootless user-mode NAT with SSH forwarded on 127.0.0.1;
    #: "tap": TAP device + nftables NAT (root); "none": no NIC (agent channel only).
    network: Literal["user", "tap", "none"] = "user"
    #: Command channel: "auto" uses the guest agent when present and SSH otherwise.
    #: "vsock" (the public API's name for the agent channel) is accepted as "agent".
    comm_channel: Literal["auto", "agent", "ssh"] = "auto"
    env_vars: dict[str, str] = Field(default_factory=dict)
    retain_disk_on_delete: bool = False
    #: Extra host→guest TCP forwards: {host_port: guest_port}, bound on 127.0.0.1.
    port_forwards: dict[int, int] = Field(default_factory=dict)
    #: Host directories shared into the guest (see :class:`WorkspaceMount`).
    workspace_mounts: list[WorkspaceMount] = Field(default_factory=list)
    #: Default caps of every command session (``run(..., limits=...)`` overrides per call).
    command_limits: Limits | None = None
    #: Egress policy, enforced by the host (see :class:`InternetSettings`).
    internet_settings: InternetSettings = Field(default_factory=InternetSettings)

    @field_validator("comm_channel", mode="before")
    @classmethod
    def _channel_alias(cls, v: Any) -> Any:
        return "agent" if v == "vsock" else v

    @field_validator("workspace_mounts")
    @classmethod
    def _check_mounts(cls, v: list[WorkspaceMount]) -> list[WorkspaceMount]:
        if len(v) > MAX_WORKSPACE_MOUNTS:
            raise ValueError(f"at most {MAX_WORKSPACE_MOUNTS} workspace mounts, got {len(v)}")
        seen: set[str] = set()
        for m in v:
            for other in seen:
                if (
                    m.guest_path == other
                    or m.guest_path.startswith(other + "/")
                    or other.startswith(m.guest_path + "/")
                ):
                    raise ValueError(f"workspace mounts {other!r} and {m.guest_path!r} overlap")
            seen.add(m.guest_path)
        return v

    @field_validator("vm_id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not VM_ID_RE.match(v):
            raise ValueError(
                "vm_id must be 1-63 characters of letters, digits, '-' or '_', starting "
                "with a letter or digit"
            )
        return v

    @field_validator("kernel_path", "rootfs_path", "initrd_path")
    @classmethod
    def _check_path(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        p = Path(v).expanduser()
        if not p.is_file():
            raise ValueError(f"file does not exist: {p}")
        if _qcow2_backing(p):
            # QEMU would open the backing chain too: any host file the header names.
            raise ValueError(
                f"{p} is a qcow2 image with a backing file; flatten it first "
                "(qemu-img convert -O qcow2 in.qcow2 flat.qcow2) or pass a raw image"
            )
        return p.resolve()

    @field_validator("boot_args")
    @classmethod
    def _check_boot_args(cls, v: str) -> str:
        if "\n" in v or "\x00" in v or len(v) > 2048:
            raise ValueError("boot_args must be one line of at most 2048 characters")
        return v

    @field_validator("env_vars")
    @classmethod
    def _check_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, val in v.items():
            validate_env_key(key)
            if "\x00" in str(val):
                raise ValueError(f"env var {key!r} contains a NUL byte")
        return {k: str(val) for k, val in v.items()}

    @field_validator("port_forwards")
    @classmethod
    def _check_ports(cls, v: dict[int, int]) -> dict[int, int]:
        for hp, gp in v.items():
            if not (1024 <= int(hp) <= 65535) or not (1 <= int(gp) <= 65535):
                raise ValueError(f"port forward {hp}->{gp}: host port must be 1024-65535, guest 1-65535")
        return v


def _qcow2_backing(p: Path) -> bool:
    """``p`` is a qcow2 image whose header names a backing file."""
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) == 16 and head[:4] == b"QFI\xfb" and int.from_bytes(head[8:16], "big") != 0


def validate_env_key(key: str) -> str:
    """Raise ``ValueError`` unless ``key`` is a valid shell variable name."""
    if not isinstance(key, str) or not ENV_KEY_RE.match(key):
        raise ValueError(
            f"invalid environment variable name {key!r}: use letters, digits and '_', "
            "not starting with a digit"
        )
    return key


class NetworkInfo(BaseModel):
    """How the guest is reached from the host."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    mode: str = "user"
    guest_ip: str | None = None
    gateway_ip: str | None = None
    netmask: str | None = None
    tap_device: str | None = None
    mac_address: str | None = None
    #: Host port on 127.0.0.1 forwarded to the guest's SSH port (22).
    ssh_host_port: int | None = None
    port_forwards: dict[int, int] = Field(default_factory=dict)


class VMInfo(BaseModel):
    """Snapshot of a VM's record in the state store (refresh with ``SmolVM.refresh()``)."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    vm_id: str
    status: VMState
    config: VMConfig
    network: NetworkInfo = Field(default_factory=NetworkInfo)
    backend: str = "qemu"
    pid: int | None = None
    #: "kvm" or "tcg" (QEMU), with the reason the host probe gave.
    accelerator: str | None = None
    accelerator_reason: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    vm_dir: Path | None = None
    disk_path: Path | None = None
    error: str | None = None
    #: Present when the VM was restored from a snapshot.
    snapshot: str | None = None
    #: Pool key while the VM waits, paused, in a warm pool (None once handed out).
    pool: str | None = None


@dataclass(frozen=True)
class CommandResult:
    """Result of one command run in the guest.

    Attributes:
        exit_code: process exit status (0 = success; 128+N when killed by signal N).
        stdout: standard output decoded as UTF-8 (undecodable bytes replaced).
        stderr: standard error decoded likewise.
        duration: wall time of the command in seconds, measured on the host.
        stdout_bytes / stderr_bytes: the raw bytes, for binary output.
        truncated: output beyond ``max_output_bytes`` (per stream) was not kept.
    """

    exit_code: int
    stdout: str
    stderr: str
    duration: float = 0.0
    stdout_bytes: bytes | None = field(default=None, repr=False, compare=False)
    stderr_bytes: bytes | None = field(default=None, repr=False, compare=False)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when ``exit_code == 0``."""
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """``stdout`` with surrounding whitespace stripped."""
        return self.stdout.strip()

    @classmethod
    def from_bytes(
        cls, exit_code: int, out: bytes, err: bytes, duration: float = 0.0, truncated: bool = False
    ) -> CommandResult:
        return cls(
            exit_code,
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
            duration,
            out,
            err,
            truncated,
        )


__all__ = [
    "VMState",
    "VMConfig",
    "VMInfo",
    "NetworkInfo",
    "CommandResult",
    "DEFAULT_BOOT_ARGS",
    "validate_env_key",
]
