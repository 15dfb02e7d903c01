"""Environment variables persisted in the guest for login shells (a part of ``SmolVM``,
kept apart to keep modules small)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from smolvm.callbacks import Callback, EnvContext, around
from smolvm.options import checked_env
from smolvm.runtime.identity import read_guest_env, write_guest_env
from smolvm.transports.base import Transport
from smolvm.vm import SmolVMManager

T = TypeVar("T")


class GuestEnv:
    """Mixin of :class:`smolvm.SmolVM`: needs ``vm_id``, ``_manager``, ``_callbacks``,
    ``_channel`` and ``_crash_checked``."""

    _manager: SmolVMManager
    _callbacks: Sequence[Callback]

    @property
    def vm_id(self) -> str:
        raise NotImplementedError

    def _channel(self) -> Transport:
        raise NotImplementedError

    def _crash_checked(self, call: Callable[[], T]) -> T:
        raise NotImplementedError

    def list_env_vars(self) -> dict[str, str]:
        """Variables in the guest's /etc/profile.d/smolvm_env.sh."""
        return self._crash_checked(lambda: read_guest_env(self._channel()))

    def set_env_vars(self, env_vars: dict[str, str], *, merge: bool = True) -> dict[str, str]:
        """Persist variables for login-shell commands (survive stop/start); returns all vars."""
        current = self.list_env_vars() if merge else {}
        new = checked_env(env_vars)
        current.update(new)
        around(self._callbacks, "env", EnvContext(self.vm_id, set=new), lambda: self._write_env(current))
        return current

    def unset_env_vars(self, keys: list[str]) -> dict[str, str]:
        current = self.list_env_vars()
        for k in keys:
            current.pop(k, None)
        around(
            self._callbacks, "env", EnvContext(self.vm_id, unset=list(keys)), lambda: self._write_env(current)
        )
        return current

    def _write_env(self, env: dict[str, str]) -> None:
        self._crash_checked(lambda: write_guest_env(self._channel(), env))
        self._manager.set_config_env(self.vm_id, env)
