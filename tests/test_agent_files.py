"""Streamed file transfer through the real agent (and property tests of binary safety)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolvm.exceptions import TransportError
from smolvm.transports.agent import AgentError, GuestFileNotFoundError
from smolvm.transports.base import ExecRequest
from test_agent_support import (  # noqa: F401  (fixtures are imported by name)
    agent,
    agent_bin,
    needs_busybox,
    run,
    shared,
    shell,
    t,
)

pytestmark = needs_busybox


# -- files --------------------------------------------------------------------------------
def test_upload_download_large_file_keeps_mode(t, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024 + 123))
    src.chmod(0o751)
    remote = tmp_path / "guest" / "copy.bin"
    remote.parent.mkdir()
    t.upload(src, str(remote))
    assert remote.read_bytes() == src.read_bytes()
    assert remote.stat().st_mode & 0o7777 == 0o751
    t.upload(src, str(remote), mode=0o600)  # replaces atomically
    assert remote.stat().st_mode & 0o7777 == 0o600
    assert [p.name for p in remote.parent.iterdir()] == ["copy.bin"]  # no temp files left
    remote.chmod(0o4755)
    back = tmp_path / "back.bin"
    t.download(str(remote), back)
    assert back.read_bytes() == src.read_bytes()
    assert back.stat().st_mode & 0o7777 == 0o755  # never setuid on the host


def test_write_read_file(t, tmp_path):
    p = tmp_path / "a" / "b" / "f.txt"
    t.write_file(str(p), b"hello", mode=0o640, make_parents=True, fsync=True)
    assert p.read_bytes() == b"hello" and p.stat().st_mode & 0o777 == 0o640
    assert t.read_file(str(p)) == b"hello"
    t.write_file(str(p), b"")
    assert t.read_file(str(p)) == b""


def test_missing_file_errors(t, tmp_path):
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    with pytest.raises(GuestFileNotFoundError) as ei:
        t.read_file(str(tmp_path / "nope"))
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, TransportError)
    assert "No such file" in ei.value.message
    with pytest.raises(FileNotFoundError):
        t.download(str(tmp_path / "nope"), tmp_path / "local")
    assert not (tmp_path / "local").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(GuestFileNotFoundError):
        t.write_file(str(tmp_path / "no" / "dir" / "f"), b"x")
    with pytest.raises(AgentError, match="Is a directory"):
        t.read_file(str(tmp_path))
    with pytest.raises(AgentError, match="Is a directory"):
        t.write_file(str(tmp_path), b"x")
    assert run(t, "echo ok").stdout == "ok\n"  # the channel is fine afterwards


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300_000), mode=st.integers(0o400, 0o777))
def test_property_file_roundtrip(shared, tmp_path, data, mode):
    p = tmp_path / "prop.bin"
    shared.write_file(str(p), data, mode=mode)
    assert shared.read_file(str(p)) == data
    assert p.stat().st_mode & 0o777 == mode


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300_000))
def test_property_cat_roundtrip(shared, data):
    r = shared.exec(ExecRequest("cat", shell="raw", stdin=data))
    assert r.stdout_bytes == data and r.exit_code == 0
