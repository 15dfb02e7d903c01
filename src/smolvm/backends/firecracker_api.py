"""Minimal client for Firecracker's REST API (JSON over HTTP/1.1 on a UNIX socket).

Standard library only. One connection per request: Firecracker serves one request at a
time, and a fresh connection per call keeps a dead or restarted VMM from wedging a client.

Errors: Firecracker answers a rejected request with HTTP 400 and ``{"fault_message": ...}``;
that, and any transport failure, becomes :class:`smolvm.exceptions.BackendError` with the
fault text in the message and ``details`` (``method``, ``path``, ``status``, ``fault_message``).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

from smolvm.exceptions import BackendError

__all__ = ["FirecrackerAPI", "wait_for_socket"]

#: AF_UNIX sun_path limit on Linux, including the terminating NUL.
UNIX_PATH_MAX = 108


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class FirecrackerAPI:
    """Talks to one Firecracker process through its ``--api-sock``."""

    def __init__(self, socket_path: Path | str, timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer (``None`` for 204)."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = _UnixHTTPConnection(self.socket_path, self.timeout if timeout is None else timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            what = type(exc).__name__ if not str(exc) else str(exc)
            raise BackendError(
                f"Firecracker API {method} {path}: cannot talk to {self.socket_path}: {what} "
                "(is the firecracker process still running? see its log in the VM directory)",
                {"method": method, "path": path, "socket": self.socket_path, "error": what},
            ) from None
        finally:
            conn.close()

        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = raw.decode("utf-8", "replace")
        if 200 <= status < 300:
            return data
        fault = data.get("fault_message") if isinstance(data, dict) else None
        fault = fault or (data if isinstance(data, str) and data else f"HTTP {status}")
        raise BackendError(
            f"Firecracker rejected {method} {path} (HTTP {status}): {fault}",
            {
                "method": method,
                "path": path,
                "status": status,
                "fault_message": fault,
                "request": body,
                "socket": self.socket_path,
            },
        )

    def put(self, path: str, body: dict[str, Any], **kw: Any) -> Any:
        return self.request("PUT", path, body, **kw)

    def patch(self, path: str, body: dict[str, Any], **kw: Any) -> Any:
        return self.request("PATCH", path, body, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, None, **kw)


def wait_for_socket(path: Path | str, timeout: float, alive: Any = None, interval: float = 0.01) -> bool:
    """Poll until something accepts connections on UNIX socket ``path``.

    ``alive`` is an optional zero-argument callable; polling stops early (returning False)
    when it returns False (the process that should listen has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.05, min(1.0, timeout)))
            s.connect(str(path))
            return True
        except OSError:
            pass
        finally:
            s.close()
        if alive is not None and not alive():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
