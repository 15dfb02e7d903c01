"""VM lifecycle commands: create, start, stop, delete, list, info, logs, ssh, reconcile, prune."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import (
    CLIError,
    emit_json,
    err,
    fmt_age,
    open_manager,
    out,
    parse_env_pairs,
    status_style,
    usage_error,
    vm_to_dict,
)

VmId = Annotated[str, typer.Argument(help="VM id (see `smolvm list`).", metavar="ID")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
STATUSES = ("created", "running", "paused", "stopped", "error")


def _parse_ports(items: list[str] | None) -> dict[int, int]:
    fwd: dict[int, int] = {}
    for item in items or []:
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise usage_error(f"--port expects HOST:GUEST (e.g. 8080:80), got {item!r}")
        fwd[int(host)] = int(guest)
    return fwd


def build_config(
    *,
    vm_id: str | None,
    mem: int | None,
    vcpus: int | None,
    disk: int | None,
    env: list[str] | None,
    channel: str | None,
    network: str | None = None,
    ports: list[str] | None = None,
    image: str | None = None,
    mounts: list[str] | None = None,
    internet: dict[str, Any] | None = None,
) -> Any:
    """A ``VMConfig`` from CLI options (building the default image with progress if needed)."""
    from smolvm.cli.images import ensure_image
    from smolvm.types import VMConfig

    fields: dict[str, Any] = {}
    for key, val in (
        ("vm_id", vm_id),
        ("mem_size_mib", mem),
        ("vcpu_count", vcpus),
        ("disk_size_mib", disk),
        ("comm_channel", channel),
        ("network", network),
    ):
        if val is not None:
            fields[key] = val
    if env:
        fields["env_vars"] = parse_env_pairs(env)
    if ports:
        fields["port_forwards"] = _parse_ports(ports)
    if mounts:
        from smolvm.options import parse_mounts

        fields["workspace_mounts"] = parse_mounts(mounts)
    if internet:
        fields["internet_settings"] = internet
    if image:
        from smolvm.images.builder import ImageBuilder

        art = ImageBuilder(common.image_dir()).get(image)
        if art is None:
            raise CLIError(
                f"no image named {image!r}",
                f"see `smolvm image list`, or build it with `smolvm image build {image}`",
            )
    else:
        art = ensure_image()  # the default image; a no-op once built
    fields["kernel_path"], fields["rootfs_path"] = art.kernel, art.rootfs
    return VMConfig(**fields)


def create(
    vm_id: Annotated[str | None, typer.Option("--id", help="VM id (default: random vm-xxxxxxxx).")] = None,
    mem: Annotated[int | None, typer.Option("--mem", help="Memory in MiB (default 512).", min=128)] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="Virtual CPUs (default 1).", min=1)] = None,
    disk: Annotated[
        int | None, typer.Option("--disk", help="Disk size in MiB (default: image size).", min=64)
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="Environment variable KEY=VALUE for login shells (repeatable)."),
    ] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Command channel: auto|agent|ssh.")] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="user (NAT, default) | tap (root) | none.")
    ] = None,
    port: Annotated[
        list[str] | None,
        typer.Option("--port", "-p", help="Forward 127.0.0.1:HOST to guest port: HOST:GUEST (repeatable)."),
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Image name (default: the default image, built if missing).")
    ] = None,
    mount: Annotated[
        list[str] | None,
        typer.Option(
            "--mount",
            "-v",
            help="Share a host directory: HOST:GUEST (read-only, writable overlay in the VM) "
            "or HOST:GUEST:rw (writes reach the host). Repeatable.",
        ),
    ] = None,
    allow_domain: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-domain",
            help="Allow only these names over HTTP/HTTPS (repeatable; *.example.com for subdomains).",
        ),
    ] = None,
    allow_cidr: Annotated[
        list[str] | None,
        typer.Option("--allow-cidr", help="Also allow this IP range, any port (repeatable)."),
    ] = None,
    no_internet: Annotated[
        bool, typer.Option("--no-internet", help="No egress at all (only --allow-cidr ranges).")
    ] = False,
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="Upstream resolver for the guest's DNS (repeatable).")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Boot the VM right away.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Boot timeout in seconds (with --start).")
    ] = 60.0,
) -> None:
    """Create a VM (not started unless --start) and print its id.

    Egress is enforced by the host: by default the guest reaches the public internet but
    never the host, other sandboxes, private or link-local ranges."""
    if no_internet and allow_domain:
        raise usage_error("--no-internet and --allow-domain contradict each other; pick one")
    internet: dict[str, Any] = {}
    if no_internet:
        internet["allowed_domains"] = []
    elif allow_domain:
        internet["allowed_domains"] = allow_domain
    if allow_cidr:
        internet["allowed_cidrs"] = allow_cidr
    if dns:
        internet["dns_servers"] = dns
    if channel is not None and channel not in ("auto", "agent", "ssh", "vsock"):
        raise usage_error(f"--channel must be auto, agent (alias vsock) or ssh, got {channel!r}")
    if network is not None and network not in ("user", "tap", "none"):
        raise usage_error(f"--network must be user, tap or none, got {network!r}")
    cfg = build_config(
        vm_id=vm_id,
        mem=mem,
        vcpus=vcpus,
        disk=disk,
        env=env,
        channel=channel,
        network=network,
        ports=port,
        image=image,
        mounts=mount,
        internet=internet,
    )
    with open_manager() as m:
        vm = m.create(cfg)
        if start:
            _start(m, vm.vm_id, timeout)
    out.print(vm.vm_id, markup=False)


def _start(m: Any, vm_id: str, timeout: float) -> Any:
    t0 = time.monotonic()
    with err.status(f"booting {vm_id}…") if err.is_terminal else contextlib.nullcontext():
        info = m.start(vm_id, boot_timeout=timeout)
    err.print(f"started {vm_id} in {time.monotonic() - t0:.1f} s (accelerator {info.accelerator or '?'})")
    return info


def start(
    vm_id: VmId,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait until the guest is ready.")
    ] = 60.0,
) -> None:
    """Boot a created or stopped VM and wait until it is ready."""
    with open_manager() as m:
        info = m.get(vm_id)
        if str(info.status) == "running":
            err.print(f"{vm_id} is already running")
            return
        _start(m, vm_id, timeout)


def stop(
    vm_ids: Annotated[list[str], typer.Argument(help="VM id(s).", metavar="ID...")],
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for a clean shutdown before killing.")
    ] = 10.0,
) -> None:
    """Shut VMs down cleanly (killed after --timeout seconds). Disks are kept."""
    with open_manager() as m:
        for vm_id in vm_ids:
            before = str(m.get(vm_id).status)
            t0 = time.monotonic()
            m.stop(vm_id, timeout=timeout)
            if before in ("running", "paused"):
                err.print(f"stopped {vm_id} in {time.monotonic() - t0:.1f} s")
            else:
                err.print(f"{vm_id} was not running ({before})")


def pause(vm_id: VmId) -> None:
    """Freeze a running VM (its vCPUs stop; memory stays allocated)."""
    with open_manager() as m:
        m.pause(vm_id)
    err.print(f"paused {vm_id}")


def resume(vm_id: VmId) -> None:
    """Continue a paused VM (its clock is resynchronised)."""
    with open_manager() as m:
        m.resume(vm_id)
    err.print(f"resumed {vm_id}")


def delete(
    vm_ids: Annotated[list[str], typer.Argument(help="VM id(s).", metavar="ID...")],
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Delete even if running (stops it first).")
    ] = False,
) -> None:
    """Delete VMs: process, disk, forwards and state."""
    with open_manager() as m:
        infos = [m.get(v) for v in vm_ids]  # every id must exist before anything is deleted
        running = [i.vm_id for i in infos if str(i.status) in ("running", "paused")]
        if running and not force:
            raise CLIError(
                f"VM {', '.join(running)} is running",
                f"stop it first (`smolvm stop {' '.join(running)}`) or pass --force",
            )
        for i in infos:
            if i.vm_id in running and i.config.retain_disk_on_delete:
                m.stop(i.vm_id, timeout=5.0)  # the disk survives: let the guest sync it
            m.delete(i.vm_id)
            err.print(f"deleted {i.vm_id}")


def list_vms(
    status: Annotated[
        str | None, typer.Option("--status", help="Only VMs in this state: " + "|".join(STATUSES) + ".")
    ] = None,
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print ids only.")] = False,
) -> None:
    """List VMs."""
    if status is not None and status not in STATUSES:
        raise usage_error(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    from smolvm.types import VMState

    with open_manager() as m:
        vms = m.list_vms(VMState(status) if status else None)
    if json_out:
        emit_json([vm_to_dict(v) for v in vms])
        return
    if quiet:
        for v in vms:
            out.print(v.vm_id, markup=False)
        return
    if not vms:
        err.print(
            "no VMs" + (f" with status {status}" if status else "") + ": create one with `smolvm create`"
        )
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("ID", "STATUS", "BACKEND", "ACCEL", "VCPUS", "MEM", "SSH", "CREATED"):
        t.add_column(col)
    for v in vms:
        st = str(v.status)
        ssh = (
            f"127.0.0.1:{v.network.ssh_host_port}" if v.network.ssh_host_port else (v.network.guest_ip or "-")
        )
        t.add_row(
            v.vm_id,
            f"[{status_style(st)}]{st}[/]" if status_style(st) else st,
            v.backend,
            v.accelerator or "-",
            str(v.config.vcpu_count),
            f"{v.config.mem_size_mib} MiB",
            ssh,
            fmt_age(v.created_at),
        )
    out.print(t)


def egress_summary(net: Any) -> str:
    """One line saying what a VM's policy lets out (host and private ranges never)."""
    what = (
        "public internet"
        if net.open_internet
        else (f"HTTP(S) to {', '.join(net.domains)}" if net.domains else "none")
    )
    extra = [f"+ {', '.join(net.allowed_cidrs)}"] if net.allowed_cidrs else []
    extra += [f"dns {', '.join(net.dns_servers)}"] if net.dns_servers else []
    return common.esc(" ".join([what, *extra]))


def show_info(vm_id: VmId, json_out: JsonOpt = False) -> None:
    """Show a VM's configuration, state, network and accelerator."""
    with open_manager() as m:
        v = m.get(vm_id)
        ssh = m.get_ssh_commands(vm_id).get("localhost_port")
    d = vm_to_dict(v)
    d["serial_log"] = str(Path(v.vm_dir or "") / "console" / "current") if v.vm_dir else None
    d["ssh_command"] = ssh
    if json_out:
        emit_json(d)
        return
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    st = str(v.status)
    rows: list[tuple[str, str]] = [
        ("id", v.vm_id),
        ("status", f"[{status_style(st)}]{st}[/]" if status_style(st) else st),
        ("backend", v.backend),
        (
            "accelerator",
            f"{v.accelerator or '-'}" + (f" ({v.accelerator_reason})" if v.accelerator_reason else ""),
        ),
        ("pid", str(v.pid or "-")),
        ("vcpus", str(v.config.vcpu_count)),
        ("memory", f"{v.config.mem_size_mib} MiB"),
        ("disk", f"{v.disk_path}" + (f" ({v.config.disk_size_mib} MiB)" if v.config.disk_size_mib else "")),
        ("kernel", str(v.config.kernel_path)),
        ("channel", str(v.config.comm_channel)),
        ("network", v.network.mode + (f", guest {v.network.guest_ip}" if v.network.guest_ip else "")),
    ]
    if v.network.ssh_host_port:
        rows.append(("ssh port", f"127.0.0.1:{v.network.ssh_host_port}"))
    if v.network.port_forwards:
        rows.append(("forwards", ", ".join(f"127.0.0.1:{h}→{g}" for h, g in v.network.port_forwards.items())))
    if v.network.mode != "none":
        rows.append(("egress", egress_summary(v.config.internet_settings)))
    if v.config.env_vars:
        rows.append(
            ("env", " ".join(f"{k}={shlex.quote(val)}" for k, val in sorted(v.config.env_vars.items())))
        )
    rows += [
        ("created", f"{v.created_at} ({fmt_age(v.created_at)})"),
        ("started", f"{v.started_at} ({fmt_age(v.started_at)})" if v.started_at else "-"),
        ("vm dir", str(v.vm_dir)),
    ]
    if v.snapshot:
        rows.append(("snapshot", v.snapshot))
    if v.error:
        rows.append(("error", f"[red]{common.esc(v.error)}[/]"))
    for k, val in rows:
        t.add_row(k, val if k in ("status", "error") else common.esc(val))
    out.print(t)


def logs(
    vm_id: VmId,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing new output until the VM stops (Ctrl-C to quit)."),
    ] = False,
    lines: Annotated[int | None, typer.Option("--lines", "-n", help="Only the last N lines.", min=0)] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Pass the guest's terminal control sequences through.")
    ] = False,
) -> None:
    """Print the VM's serial console log (kernel and init messages; the last few MiB)."""
    from smolvm.runtime import console

    clean = not raw and sys.stdout.isatty()  # the console is guest-written: never obeyed
    stdout = sys.stdout.buffer

    def out(data: bytes) -> None:
        stdout.write(common.neutralize(data) if clean else data)
        stdout.flush()

    with open_manager() as m:
        m.get(vm_id)
        vm_dir = m.vm_dir(vm_id)
        if not console.files(vm_dir) and not follow:
            err.print(f"{vm_id} has no console log yet (it has never been started)")
            return
        if lines is not None:
            out(console.last_lines(vm_dir, lines))
        else:
            for chunk in console.chunks(vm_dir):
                out(chunk)
        if follow:
            with contextlib.suppress(KeyboardInterrupt):
                _follow(m, vm_id, console.console_dir(vm_dir) / "current", out)


def _follow(m: Any, vm_id: str, current: Path, out: Any) -> None:
    """Print what is appended to ``current``, across rotations, until the VM stops."""
    f = None
    try:
        with contextlib.suppress(OSError):
            f = open(current, "rb")
            f.seek(0, os.SEEK_END)
        last_check = time.monotonic()
        while True:
            if f is not None and (chunk := f.read(65536)):
                out(chunk)
                continue
            try:
                ino = current.stat().st_ino
            except FileNotFoundError:
                ino = None
            if ino is not None and (f is None or os.fstat(f.fileno()).st_ino != ino):
                if f is not None:
                    f.close()  # rotated: its rest was read above
                f = open(current, "rb")
                continue
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                alive = ("running", "paused", "created")
                if not m.state.vm_exists(vm_id) or str(m.get(vm_id).status) not in alive:
                    return
            time.sleep(0.1)
    finally:
        if f is not None:
            f.close()


def ssh(
    vm_id: VmId,
    command: Annotated[
        list[str] | None, typer.Argument(help="Optional command to run instead of a shell (after `--`).")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the ssh command instead of running it.")
    ] = False,
    user: Annotated[str, typer.Option("--user", "-u", help="Guest user.")] = "root",
) -> None:
    """Open an interactive SSH session (the VM's host key is pinned; no prompts)."""
    with open_manager() as m:
        info = m.get(vm_id)
        cmds = m.get_ssh_commands(vm_id, ssh_user=user)
    line = cmds.get("localhost_port") or (cmds.get("private_ip") if info.network.mode == "tap" else None)
    if not line:
        raise CLIError(
            f"VM {vm_id} has no SSH endpoint (network={info.network.mode})",
            "create the VM with --network user (default) or tap",
        )
    argv = shlex.split(line) + list(command or [])
    if print_only:
        out.print(shlex.join(argv), markup=False)
        return
    common.require_running(info)
    if not shutil.which(argv[0]):
        raise CLIError("ssh client not found", "apt-get install openssh-client")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


def reconcile(json_out: JsonOpt = False) -> None:
    """Find VMs whose VMM process died (marked error) and free orphaned resources."""
    with open_manager() as m:
        stale = m.reconcile()
    if json_out:
        emit_json({"marked_error": stale})
        return
    for vm_id in stale:
        out.print(vm_id, markup=False)
    err.print(f"{len(stale)} VM(s) marked error" + (": delete them with `smolvm prune`" if stale else ""))


def prune(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every stopped or errored VM (after a reconcile)."""
    with open_manager() as m:
        m.reconcile()
        victims = [v for v in m.list_vms() if str(v.status) in ("stopped", "error")]
        if not victims:
            err.print("nothing to prune")
            return
        ids = [v.vm_id for v in victims]
        if not yes:
            if not sys.stdin.isatty():
                raise usage_error(
                    f"would delete {len(ids)} VM(s): {', '.join(ids)}",
                    "pass --yes to confirm when not on a terminal",
                )
            if not typer.confirm(f"Delete {len(ids)} VM(s): {', '.join(ids)}?"):
                raise typer.Exit(1)
        for vm_id in ids:
            m.delete(vm_id)
            out.print(vm_id, markup=False)
    err.print(f"deleted {len(ids)} VM(s)")
