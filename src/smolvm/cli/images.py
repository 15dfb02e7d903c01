"""``smolvm image build|list|rm|prune`` and the image-build progress display."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from smolvm.cli import common
from smolvm.cli.common import CLIError, emit_json, err, fmt_age, fmt_bytes, out

if TYPE_CHECKING:
    from smolvm.images.artifacts import ImageArtifacts

image_app = typer.Typer(
    name="image",
    help="Build and manage guest images (kernel + initramfs + root filesystem).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


class BuildProgress:
    """Step-by-step progress for an image build: a spinner with the current step and elapsed
    time on a terminal; plain timestamped lines otherwise (logs, CI)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.t0 = time.monotonic()
        self._status: Any = None

    def __enter__(self) -> BuildProgress:
        if err.is_terminal:
            self._status = err.status(f"{self.title}…", spinner="dots")
            self._status.__enter__()
        else:
            err.print(f"{self.title}…")
        return self

    def __call__(self, msg: str) -> None:
        stamp = f"[dim]{time.monotonic() - self.t0:6.1f}s[/]"
        err.print(f"  {stamp} {common.esc(msg)}")
        if self._status is not None:
            self._status.update(f"{self.title}: {common.esc(msg)}")

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


def ensure_image(
    name: str = "default", *, force: bool = False, quiet_if_ready: bool = True
) -> ImageArtifacts:
    """The image ``name`` (building it with progress if missing, stale, or ``force``)."""
    from smolvm.images.builder import DEFAULT_IMAGE, ImageBuilder
    from smolvm.snapshots import build_default_snapshot

    builder = ImageBuilder(common.image_dir())
    art = builder.get(name)
    if art is not None and not force and (name != DEFAULT_IMAGE or builder.is_current(name)):
        if not quiet_if_ready:
            err.print(f"image [bold]{name}[/] is up to date ({art.path})")
        return art
    why = "rebuilding" if force else ("updating" if art is not None else "building")
    with BuildProgress(f"{why} image {name} (first build takes about a minute)") as progress:
        builder = ImageBuilder(common.image_dir(), progress=progress)
        if name == DEFAULT_IMAGE and not force:
            art = builder.ensure_default()
        else:
            art = builder.build_image(name, force=force)
        if name == DEFAULT_IMAGE:
            # SmolVM() restores this (~0.3 s) instead of cold-booting (~3-4 s).
            progress(f"[{name}] booting once for the ready-to-restore snapshot")
            build_default_snapshot(common.data_dir(), builder.cache_dir)
    err.print(f"[green]image {name} ready[/] in {time.monotonic() - progress.t0:.1f} s ({art.path})")
    return art


def _size(art: ImageArtifacts) -> int:
    """Bytes actually used on disk (the rootfs is sparse)."""
    total = 0
    for p in (art.kernel, art.initrd, art.rootfs):
        try:
            total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total


def image_dict(art: ImageArtifacts, current: bool | None) -> dict[str, Any]:
    m = art.manifest
    return {
        "name": art.name,
        "path": str(art.path),
        "kernel": str(art.kernel),
        "initrd": str(art.initrd),
        "rootfs": str(art.rootfs),
        "kernel_version": (m.get("kernel") or {}).get("version"),
        "distro": m.get("distro"),
        "suite": m.get("suite"),
        "rootfs_size_mib": m.get("rootfs_size_mib"),
        "disk_usage_bytes": _size(art),
        "agent": art.has_agent,
        "ssh": art.has_ssh,
        "built_at": m.get("built_at"),
        "build_seconds": m.get("build_seconds"),
        "current": current,
    }


@image_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="Image name.")] = "default",
    force: Annotated[bool, typer.Option("--force", "-f", help="Rebuild even if up to date.")] = False,
) -> None:
    """Build a Debian guest image with the guest agent and SSH (cached; ~1 min the first time).

    Needs root (debootstrap), the Debian mirror, musl-gcc and debootstrap: run `smolvm doctor`.
    """
    art = ensure_image(name, force=force, quiet_if_ready=False)
    out.print(str(art.path), markup=False)


@image_app.command("list")
def list_images(json_out: JsonOpt = False) -> None:
    """List built images."""
    from smolvm.images.builder import DEFAULT_IMAGE, ImageBuilder

    builder = ImageBuilder(common.image_dir())
    rows = [
        image_dict(a, builder.is_current(a.name) if a.name == DEFAULT_IMAGE else None)
        for a in builder.list_images()
    ]
    if json_out:
        emit_json(rows)
        return
    if not rows:
        err.print(f"no images in {builder.cache_dir}: build one with `smolvm image build`")
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "KERNEL", "SIZE", "AGENT", "BUILT", "PATH"):
        t.add_column(col)
    for r in rows:
        name = r["name"] + (" (stale)" if r["current"] is False else "")
        t.add_row(
            name,
            r["kernel_version"] or "-",
            fmt_bytes(r["disk_usage_bytes"]),
            "yes" if r["agent"] else "no",
            fmt_age(r["built_at"]),
            r["path"],
        )
    out.print(t)


@image_app.command("rm")
def rm(names: Annotated[list[str], typer.Argument(help="Image name(s).")]) -> None:
    """Remove built images (VMs created from them keep working only while their files exist)."""
    from smolvm.images.builder import ImageBuilder

    builder = ImageBuilder(common.image_dir())
    in_use = _images_in_use()
    for name in names:
        if builder.get(name) is not None and str(builder.image_path(name).resolve()) in in_use:
            raise CLIError(
                f"image {name!r} is used by VM(s) "
                f"{', '.join(sorted(in_use[str(builder.image_path(name).resolve())]))}",
                "delete those VMs first (`smolvm delete ID`)",
            )
        builder.remove(name)
        err.print(f"removed image {name}")


def _images_in_use() -> dict[str, set[str]]:
    """image dir → VM ids whose kernel lives there."""
    from pathlib import Path

    used: dict[str, set[str]] = {}
    with common.open_manager() as m:
        for vm in m.list_vms():
            kp = vm.config.kernel_path
            if kp:
                used.setdefault(str(Path(kp).resolve().parent), set()).add(vm.vm_id)
    return used


@image_app.command("prune")
def prune() -> None:
    """Remove cached build inputs (kernels, debootstrap bases) no image uses any more."""
    from smolvm.images.builder import ImageBuilder

    removed = ImageBuilder(common.image_dir()).prune()
    for p in removed:
        out.print(p, markup=False)
    err.print(f"removed {len(removed)} unused cache entr{'y' if len(removed) == 1 else 'ies'}")
