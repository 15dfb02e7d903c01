"""The KVM speed probe: KVM counts as usable only when a guest actually runs fast."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from smolvm.host import kvm
from smolvm.host.kvm import KVMProbe, probe_kvm, probe_kvm_cached

HAS_KVM = os.path.exists("/dev/kvm")


def _hw_virt_flags() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in text.split() for f in ("vmx", "svm"))


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("SMOLVM_ACCEL", raising=False)


@pytest.mark.skipif(not HAS_KVM, reason="no /dev/kvm on this host")
def test_probe_measures_this_host():
    t0 = time.monotonic()
    r = probe_kvm()
    took = time.monotonic() - t0
    assert r.present is True
    assert r.elapsed_ms is not None and r.elapsed_ms > 0
    assert r.iterations > 0
    assert r.projected_ms is not None
    assert took < 5.0
    if not _hw_virt_flags():
        # This CI host: /dev/kvm works but nested virtualization is emulated.
        assert r.usable is False
        assert r.accel == "tcg"
        assert "emulated" in r.reason and "using TCG" in r.reason
        assert r.projected_ms > kvm.USABLE_THRESHOLD_MS
    else:
        assert r.usable == (r.projected_ms < kvm.USABLE_THRESHOLD_MS)


def test_missing_device(tmp_path):
    r = probe_kvm(device=str(tmp_path / "kvm"))
    assert r == KVMProbe(False, False, r.reason)
    assert "missing" in r.reason and "using TCG" in r.reason
    assert r.elapsed_ms is None


def test_regular_file_is_not_kvm(tmp_path):
    f = tmp_path / "kvm"
    f.write_text("")
    r = probe_kvm(device=str(f))
    assert r.present and not r.usable
    assert "not a character device" in r.reason


def test_char_device_without_kvm_api():
    r = probe_kvm(device="/dev/null")  # opens fine, but the KVM ioctls fail in the child
    assert r.present and not r.usable
    assert "KVM_GET_API_VERSION failed" in r.reason


@pytest.mark.skipif(not HAS_KVM, reason="no /dev/kvm on this host")
def test_timeout_kills_the_child_and_says_so():
    r = probe_kvm(timeout=0.01)  # shorter than starting the child at all
    assert r.present and not r.usable
    assert r.reason.startswith("too slow: emulated")


def test_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLVM_ACCEL", "kvm")
    r = probe_kvm(device=str(tmp_path / "kvm"))
    assert r.usable and r.forced and r.accel == "kvm"
    assert "forced by SMOLVM_ACCEL" in r.reason
    monkeypatch.setenv("SMOLVM_ACCEL", "TCG")
    r = probe_kvm()
    assert not r.usable and r.forced
    assert "forced by SMOLVM_ACCEL" in r.reason
    # the cached variant honours it too, without writing a cache entry
    r = probe_kvm_cached(tmp_path / "cache")
    assert r.forced and not r.usable
    assert not (tmp_path / "cache" / kvm.CACHE_FILE).exists()


def test_invalid_env_value_is_reported_and_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLVM_ACCEL", "fast")
    r = probe_kvm(device=str(tmp_path / "kvm"))
    assert not r.forced and not r.present
    assert "SMOLVM_ACCEL='fast' ignored" in r.reason


def test_cache_is_reused(tmp_path):
    device = "/dev/kvm" if HAS_KVM else str(tmp_path / "kvm")
    cache = tmp_path / "cache"
    first = probe_kvm_cached(cache, device=device)
    assert first.cached is False
    data = json.loads((cache / kvm.CACHE_FILE).read_text())
    assert data["key"]["boot_id"] == kvm._boot_id()
    t0 = time.monotonic()
    second = probe_kvm_cached(cache, device=device)
    took = time.monotonic() - t0
    assert second.cached is True
    assert took < 0.1
    assert (second.usable, second.present, second.reason, second.elapsed_ms, second.iterations) == (
        first.usable, first.present, first.reason, first.elapsed_ms, first.iterations)  # fmt: skip
    third = probe_kvm_cached(cache, device=device, refresh=True)
    assert third.cached is False


def test_cache_is_per_boot_and_per_device(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    missing = str(tmp_path / "kvm")
    probe_kvm_cached(cache, device=missing)
    calls = []
    real = kvm.probe_kvm

    def counting(*a, **kw):
        calls.append(kw.get("device"))
        return real(*a, **kw)

    monkeypatch.setattr(kvm, "probe_kvm", counting)
    assert probe_kvm_cached(cache, device=missing).cached
    assert calls == []
    # another boot: the entry is stale
    monkeypatch.setattr(kvm, "_boot_id", lambda: "another-boot")
    assert not probe_kvm_cached(cache, device=missing).cached
    assert calls == [missing]
    # another device: not the same answer either
    other = str(tmp_path / "kvm2")
    assert not probe_kvm_cached(cache, device=other).cached
    assert calls == [missing, other]


def test_corrupt_cache_is_ignored(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / kvm.CACHE_FILE).write_text("{not json")
    r = probe_kvm_cached(cache, device=str(tmp_path / "kvm"))
    assert not r.cached and not r.present
    assert json.loads((cache / kvm.CACHE_FILE).read_text())["result"]["present"] is False


def test_guest_code_is_the_documented_loop():
    code = kvm._guest_code()
    assert len(code) == 12 and code[-1] == 0xF4  # ends in hlt
    assert kvm.LOOP_ITERATIONS == 32 * 0xFFFF
