"""Firecracker API conformance server (a fake ``firecracker`` that validates requests).

See ``server.py``. Helpers for tests:

* :func:`install_fake_firecracker` writes an executable ``firecracker`` into a directory
  (for ``PATH`` or ``SMOLVM_FIRECRACKER_BIN``) that runs the server with this interpreter.
* :func:`read_requests` loads the JSON-lines request record the server writes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.py"


def install_fake_firecracker(bin_dir: Path, name: str = "firecracker") -> Path:
    """Create ``bin_dir/name``: a shell wrapper exec'ing the conformance server."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SERVER}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def read_requests(record_path: Path | str) -> list[dict[str, Any]]:
    """The requests the server recorded, oldest first (empty if none)."""
    try:
        text = Path(record_path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_path_for(api_sock: Path | str) -> Path:
    """Default record file of a server listening on ``api_sock``."""
    return Path(os.fspath(api_sock) + ".requests.jsonl")


__all__ = ["install_fake_firecracker", "read_requests", "record_path_for", "SERVER", "HERE"]
