"""SSH keys: one client key per data dir, one pinned host key per VM.

Host keys are generated on the host, handed to the guest through the config disk and
written to a per-VM known_hosts under a ``HostKeyAlias``, so neither paramiko nor the
``ssh`` commands we print ever trust a key on first use.
"""

from __future__ import annotations

import base64
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from smolvm.locks import file_lock


def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, unique
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class HostKey:
    """A VM's SSH host key: dropbear-format private key for the guest, public line for us."""

    dropbear_private: bytes
    public_line: str  # "ssh-ed25519 AAAA..."

    @classmethod
    def generate(cls) -> HostKey:
        # cryptography costs ~11 ms of `import smolvm`; only making keys needs it.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        # Dropbear's ed25519 key file: string "ssh-ed25519", string(seed || public).
        dropbear = _ssh_string(b"ssh-ed25519") + _ssh_string(seed + pub)
        blob = _ssh_string(b"ssh-ed25519") + _ssh_string(pub)
        return cls(dropbear, "ssh-ed25519 " + base64.b64encode(blob).decode())


def host_key_alias(vm_id: str) -> str:
    return f"smolvm-{vm_id}"


def write_known_hosts(path: Path, vm_id: str, public_line: str) -> Path:
    path.write_text(f"{host_key_alias(vm_id)} {public_line}\n")
    path.chmod(0o600)
    return path


def ensure_client_key(keys_dir: Path) -> tuple[Path, str]:
    """The data dir's client key (created 0600 on first use): (private path, public line)."""
    priv = keys_dir / "id_ed25519"
    pub = keys_dir / "id_ed25519.pub"
    if not priv.exists() or not pub.exists():
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Many processes/threads may start VMs at once: exactly one creates the key pair.
        with file_lock(keys_dir / ".lock"):
            if not priv.exists() or not pub.exists():
                from cryptography.hazmat.primitives import serialization  # see HostKey.generate
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                key = Ed25519PrivateKey.generate()
                line = (
                    key.public_key()
                    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    .decode()
                )
                _write_private(pub, (line + " smolvm\n").encode())
                pub.chmod(0o644)
                _write_private(
                    priv,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.OpenSSH,
                        serialization.NoEncryption(),
                    ),
                )
    os.chmod(priv, 0o600)
    return priv, pub.read_text().strip()
