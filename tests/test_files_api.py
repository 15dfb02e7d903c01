"""``vm.files`` on a real guest: read, write, list, exists, remove, make_dir, rename."""

from __future__ import annotations

import pytest

from smolvm.exceptions import GuestFileNotFoundError, TransferLimitError, ValidationError
from smolvm.files import FileInfo

pytestmark = pytest.mark.e2e


def test_files_round_trip(shared_vm) -> None:
    f = shared_vm.files
    f.make_dir("/srv/files-api/sub")
    f.write("/srv/files-api/a.txt", "héllo\n")
    f.write("/srv/files-api/bin", bytes(range(256)), mode=0o600)
    assert f.read_text("/srv/files-api/a.txt") == "héllo\n"
    assert f.read("/srv/files-api/bin") == bytes(range(256))
    entries = {i.name: i for i in f.list("/srv/files-api")}
    assert set(entries) == {"a.txt", "bin", "sub"}
    assert entries["bin"] == FileInfo("bin", "/srv/files-api/bin", "file", 256, 0o600, entries["bin"].mtime)
    assert entries["sub"].type == "dir" and entries["a.txt"].size == len("héllo\n".encode())
    assert f.exists("/srv/files-api/a.txt") and not f.exists("/srv/files-api/nope")
    f.rename("/srv/files-api/a.txt", "/srv/files-api/sub/b.txt")
    assert [i.name for i in f.list("/srv/files-api/sub")] == ["b.txt"]
    with pytest.raises(TransferLimitError):
        f.read("/srv/files-api/bin", max_bytes=10)
    with pytest.raises(GuestFileNotFoundError):
        f.read("/srv/files-api/a.txt")
    with pytest.raises(ValidationError, match="absolute"):
        f.write("relative.txt", "x")
    f.remove("/srv/files-api", recursive=True)
    assert not f.exists("/srv/files-api")
