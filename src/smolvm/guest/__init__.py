"""Code that runs inside the guest, and the build of the static guest agent.

The agent is C compiled with ``musl-gcc -static -Os -s``: a static binary execs fast under
TCG (dynamic linking dominates exec cost there) and runs in any rootfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from smolvm.exceptions import ImageError

GUEST_DIR = Path(__file__).resolve().parent

#: Every file the agent binary is built from (the image builder hashes them for its cache key).
AGENT_SOURCES: list[Path] = [
    GUEST_DIR / "agent.h",
    GUEST_DIR / "agent.c",
    GUEST_DIR / "agent_chan.c",
    GUEST_DIR / "agent_proc.c",
    GUEST_DIR / "agent_file.c",
    GUEST_DIR / "agent_cg.c",
    GUEST_DIR / "agent_watch.c",
]

# Warnings are errors: the agent is the one component every guest runs (CI builds it this way).
_CFLAGS = ["-static", "-Os", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]


def _find_compiler(cc: str | None) -> str:
    if cc:
        found = shutil.which(cc)
        if not found:
            raise ImageError(
                f"C compiler {cc!r} not found. Install it or pass cc=None to use musl-gcc "
                "(Debian/Ubuntu: `apt-get install musl-tools`)."
            )
        return found
    found = shutil.which("musl-gcc")
    if not found:
        raise ImageError(
            "musl-gcc not found: the guest agent is a static musl binary. Install it with "
            "`apt-get install musl-tools` (Debian/Ubuntu) or `apk add musl-dev gcc` (Alpine), "
            "or build the image without the agent (SSH only).",
            {"needed": "musl-gcc"},
        )
    return found


def build_agent(out_path: Path, cc: str | None = None) -> Path:
    """Compile the guest agent to ``out_path`` (a static executable) and return the path.

    ``cc`` overrides the compiler (default ``musl-gcc``); it must be able to link
    statically. Raises :class:`~smolvm.exceptions.ImageError` when no compiler is found or
    compilation fails (with the compiler's message).
    """
    missing = [str(p) for p in AGENT_SOURCES if not p.is_file()]
    if missing:
        raise ImageError(
            f"guest agent sources missing: {', '.join(missing)}. Reinstall smolvm (the package "
            "data must include src/smolvm/guest/*.c and *.h).",
            {"missing": missing},
        )
    compiler = _find_compiler(cc)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in AGENT_SOURCES if p.suffix == ".c"]
    # Build next to the target and rename: a concurrent build never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".agent-", dir=out_path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *_CFLAGS, "-o", tmp, *sources],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise ImageError(
                f"compiling the guest agent with {compiler} failed:\n{proc.stderr.strip()}",
                {"compiler": compiler, "returncode": proc.returncode},
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


__all__ = ["AGENT_SOURCES", "GUEST_DIR", "build_agent"]
