"""Where SmolVM keeps its files.

Data dir (state database, VM dirs, disks, images), resolved in this order:
``$SMOLVM_DATA_DIR`` → ``~/.local/state/smolvm`` → ``/var/lib/smolvm`` (first writable).
Images may live elsewhere (``$SMOLVM_IMAGE_DIR``) so many data dirs can share one build.
"""

from __future__ import annotations

import os
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
