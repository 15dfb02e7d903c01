"""Idle sandboxes pause (or stop) themselves: ``SmolVM(idle_timeout=seconds)``.

One daemon thread per process checks every registered :class:`IdleTimer`. A sandbox is in
use while a call into it runs (command, file transfer, env change) and while a process it
spawned still runs; idle ``timeout`` seconds after the last use, it is paused (its vCPUs
stop: no CPU, memory kept) or stopped (``action="stop"``: memory freed, disk kept). The
next call wakes it first (resume: clock reset and RNG reseeded; or start). Enforced by the
process that holds the ``SmolVM``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from smolvm.exceptions import SmolVMError, ValidationError

log = logging.getLogger(__name__)

ACTIONS = ("pause", "stop")
_timers: weakref.WeakSet[IdleTimer] = weakref.WeakSet()
_cond = threading.Condition()
_thread: threading.Thread | None = None


def check_args(timeout: float | None, action: str) -> None:
    """``ValidationError`` unless ``timeout`` is None or seconds > 0 and ``action`` known."""
    if timeout is not None and (
        not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0
    ):
        raise ValidationError(
            f"idle_timeout must be a number of seconds > 0, got {timeout!r}", field="idle_timeout"
        )
    if action not in ACTIONS:
        raise ValidationError(f"idle_action must be one of {ACTIONS}, got {action!r}", field="idle_action")


class IdleTimer:
    """Idle tracking of one sandbox. ``sleep(action)`` pauses/stops it, ``wake(action)``
    undoes that; both run under the timer's lock, never during a use."""

    def __init__(
        self,
        timeout: float,
        action: str,
        sleep: Callable[[str], None],
        wake: Callable[[str], None],
    ) -> None:
        check_args(timeout, action)
        self.timeout, self.action = float(timeout), action
        self._sleep, self._wake = sleep, wake
        self._lock = threading.RLock()
        self._last = time.monotonic()
        self._busy = 0
        self._handles: list[Any] = []
        #: The action applied while idle ("pause"/"stop"), None while awake.
        self.asleep: str | None = None
        self.closed = False
        _register(self)

    @contextmanager
    def use(self) -> Iterator[None]:
        """Mark a call into the sandbox (waking it first if idleness put it to sleep)."""
        with self._lock:
            if self.asleep is not None:
                self._wake(self.asleep)
                self.asleep = None
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()

    def track(self, handle: Any) -> Any:
        """Count a spawned process (anything with ``is_running()``) as use while it runs."""
        with self._lock:
            self._handles.append(handle)
        return handle

    def _running(self) -> bool:
        alive = []
        for h in self._handles:
            try:
                if h.is_running():
                    alive.append(h)
            except Exception:
                continue
        self._handles = alive
        if alive:
            self._last = time.monotonic()
        return bool(alive)

    def check(self, now: float) -> None:
        """Put the sandbox to sleep if it has been idle ``timeout`` seconds."""
        with self._lock:
            if self.closed or self.asleep is not None or self._busy or self._running():
                return
            if now - self._last < self.timeout:
                return
            try:
                self._sleep(self.action)
                self.asleep = self.action
            except SmolVMError as exc:  # deleted or stopped elsewhere: nothing left to watch
                log.info("idle %s failed (%s); no longer watching", self.action, exc)
                self.closed = True

    def close(self) -> None:
        self.closed = True
        with _cond:
            _timers.discard(self)


def _register(timer: IdleTimer) -> None:
    global _thread
    with _cond:
        _timers.add(timer)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="smolvm-idle", daemon=True)
            _thread.start()
        _cond.notify()


def _loop() -> None:
    while True:
        with _cond:
            timers = [t for t in _timers if not t.closed]
            tick = min((t.timeout / 4 for t in timers), default=60.0)
            _cond.wait(min(max(tick, 0.05), 1.0))
        now = time.monotonic()
        for t in timers:
            t.check(now)
