"""Where SmolVM keeps its files.

Data dir (state database, VM dirs, disks, images), resolved in this order:
``$SMOLVM_DATA_DIR`` → ``~/.local/state/smolvm`` → ``/var/lib/smolvm`` (first writable).
Images may live elsewhere (``$SMOLVM_IMAGE_DIR``) so many data dirs can share one build.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

from smolvm.exceptions import ValidationError


def _writable(p: Path) -> bool:
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Unique per process and thread: concurrent SmolVM() calls probe at the same time.
        probe = p / f".write-test-{os.getpid()}-{threading.get_ident()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """Return the data dir (created 0700 if missing)."""
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir).expanduser())
    else:
        env = os.environ.get("SMOLVM_DATA_DIR")
        if env:
            candidates.append(Path(env).expanduser())
        candidates.append(Path.home() / ".local" / "state" / "smolvm")
        candidates.append(Path("/var/lib/smolvm"))
    for c in candidates:
        if _writable(c):
            return c.resolve()
    raise ValidationError(
        f"no writable data directory among {[str(c) for c in candidates]}; "
        "set SMOLVM_DATA_DIR to a writable path",
        field="data_dir",
    )


def resolve_image_dir(data_dir: Path) -> Path:
    env = os.environ.get("SMOLVM_IMAGE_DIR")
    p = Path(env).expanduser() if env else data_dir / "images"
    p.mkdir(parents=True, exist_ok=True)
    return p.resolve()


def default_socket_dir(data_dir: Path) -> Path:
    """``/tmp/smolvm-<uid>/<data-dir hash>``: VM sockets (QMP controls the VM, the agent runs
    commands as root in the guest) live where only this user can enter, never loose in
    /tmp, and apart per data dir (two data dirs may both have a VM called "web")."""
    base = private_dir(Path("/tmp") / f"smolvm-{os.geteuid()}")
    return private_dir(base / hashlib.sha256(str(data_dir).encode()).hexdigest()[:8])


def private_dir(p: Path) -> Path:
    """Create ``p`` 0700, or check that an existing one is ours, not a symlink and closed to
    others (another local user could have made it first to watch our sockets)."""
    try:
        p.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(p)
    except OSError as exc:
        raise ValidationError(f"cannot create the socket directory {p}: {exc}", field="socket_dir") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ValidationError(
            f"{p} must be a directory owned by uid {os.geteuid()} with mode 0700 (it is "
            f"uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}); remove it or pass socket_dir=",
            field="socket_dir",
        )
    return p
