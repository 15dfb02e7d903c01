"""Hypervisor backends and their selection."""

from __future__ import annotations

import os
import shutil

from smolvm.backends.base import Backend, DiskSpec, LaunchSpec, NetSpec
from smolvm.backends.qemu import QemuBackend
from smolvm.exceptions import ValidationError
from smolvm.host.accel import accel_decision

BACKENDS = ("firecracker", "qemu", "auto")


def resolve_backend(name: str | None = None) -> str:
    """ "firecracker" | "qemu" from an explicit name, ``$SMOLVM_BACKEND``, or "auto".

    auto picks Firecracker only when its binary is installed *and* KVM is really usable
    (measured, see smolvm.host.kvm); otherwise QEMU, which also runs without KVM (TCG)."""
    choice = (name or os.environ.get("SMOLVM_BACKEND") or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValidationError(
            f"unknown backend {choice!r}: use one of {', '.join(BACKENDS)}", field="backend"
        )
    if choice != "auto":
        return choice
    if shutil.which(os.environ.get("SMOLVM_FIRECRACKER_BIN", "firecracker")):
        if accel_decision().accel == "kvm":
            return "firecracker"
    return "qemu"


def get_backend(name: str) -> Backend:
    if name == "qemu":
        return QemuBackend()
    if name == "firecracker":
        # Its HTTP client (http.client, ~9 ms) stays out of `import smolvm` without it.
        from smolvm.backends.firecracker import FirecrackerBackend

        return FirecrackerBackend()
    raise ValidationError(f"unknown backend {name!r}", field="backend")


__all__ = ["Backend", "DiskSpec", "LaunchSpec", "NetSpec", "resolve_backend", "get_backend"]
