"""The launch description of a VM (:class:`LaunchSpec`), derived from its state record."""

from __future__ import annotations

from pathlib import Path

from smolvm.backends.base import Backend, DiskSpec, LaunchSpec, NetSpec, ShareSpec
from smolvm.host.tsc import host_tsc_khz
from smolvm.images.artifacts import artifacts_for_kernel
from smolvm.network import NetworkManager
from smolvm.network.sandbox import NetSandbox
from smolvm.runtime import console
from smolvm.state.records import VMRecord

READY_MARKER = b"SMOLVM_READY"
#: Kernel arguments that make microvm boots fast and reliable under TCG (platform notes).
FAST_BOOT_ARGS = (
    "quiet cryptomgr.notests 8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp "
    "random.trust_cpu=on audit=0 selinux=0 apparmor=0 nowatchdog no_timer_check "
    # A kernel oops leaves the guest half-dead: make it a clean crash the host reports.
    "oops=panic"
)
#: MAC of a NIC whose record has none (VMs created before MACs were recorded).
DEFAULT_MAC = "52:54:00:12:34:56"


def merge_boot_args(base: str, extra: list[str]) -> str:
    """Append ``extra`` args whose key is not already set in ``base``."""
    have = {a.split("=", 1)[0] for a in base.split()}
    add = [a for a in extra if a.split("=", 1)[0] not in have]
    return " ".join([base, *add]).strip()


def launch_spec(rec: VMRecord, backend: Backend, *, vm_dir: Path, socket_dir: Path) -> LaunchSpec:
    """Everything ``backend`` needs to start the VM of ``rec`` (used by every operation)."""
    cfg = rec.config
    net = rec.network
    netspec = None
    if net.mode == "user":
        fwd = [(net.ssh_host_port or 0, 22), *((h, g) for h, g in net.port_forwards.items())]
        sealed = NetSandbox(
            dir=vm_dir,
            api_socket=socket_dir / f"smolvm-{rec.vm_id}.net.sock",
            settings=cfg.internet_settings,
            forwards=[h for h, _ in fwd if h],
        )
        netspec = NetSpec("user", net.mac_address or DEFAULT_MAC, fwd, sandbox=sealed)
    elif net.mode == "tap":
        netspec = NetSpec("tap", net.mac_address or DEFAULT_MAC, [], net.tap_device)
    disks = [
        DiskSpec(Path(rec.disk_path or ""), backend.disk_format, False, "d0"),
        DiskSpec(vm_dir / "config.tar", "raw", True, "d1"),
    ]
    art = artifacts_for_kernel(cfg.kernel_path) if cfg.kernel_path else None
    initrd = cfg.initrd_path or (art.initrd if art else None)
    args = [f"tsc_early_khz={khz}"] if (khz := host_tsc_khz()) else []
    args += FAST_BOOT_ARGS.split()
    if (narg := NetworkManager.kernel_arg(net, cfg.internet_settings)) is not None:
        args.append(narg)
    base_mib = (art.manifest.get("rootfs_size_mib") if art else None) or 0
    if cfg.disk_size_mib and cfg.disk_size_mib > base_mib:
        args.append("smolvm.resize=1")
    shares = [ShareSpec(share_tag(i), m.host_path, m.writable) for i, m in enumerate(cfg.workspace_mounts)]
    if shares:
        args.append("smolvm.shares=1")  # stage-1 loads the 9p and overlay modules
    return LaunchSpec(
        vm_id=rec.vm_id,
        vm_dir=vm_dir,
        kernel=Path(cfg.kernel_path or ""),
        initrd=initrd,
        disks=disks,
        boot_args=merge_boot_args(cfg.boot_args, args),
        vcpus=cfg.vcpu_count,
        mem_mib=cfg.mem_size_mib,
        serial_log=console.fifo_path(vm_dir),  # console.start() reads it
        agent_socket=socket_dir / f"smolvm-{rec.vm_id}.agent.sock",
        control_socket=socket_dir / f"smolvm-{rec.vm_id}.ctl.sock",
        net=netspec,
        accel=rec.accelerator or "tcg",
        agent_ports=backend.agent_ports,
        shares=shares,
    )


def share_tag(i: int) -> str:
    """The virtio-9p mount tag of a VM's ``i``-th workspace mount."""
    return f"smolvm{i}"


def mounts_file(rec: VMRecord) -> str:
    """The config-disk member telling the guest's init what to mount: one line per mount,
    ``<tag> <ro|rw> <guest path>``."""
    return "".join(
        f"{share_tag(i)} {'rw' if m.writable else 'ro'} {m.guest_path}\n"
        for i, m in enumerate(rec.config.workspace_mounts)
    )
