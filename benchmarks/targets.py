"""The wave 2 performance targets (P1-P6) and how a run's JSON is checked against them.

Every target is a ratio against the peer measured in the same run, or a count on this
machine (host speed differs ~2x between machines of this kind). P5 comes from the
``--density N`` mode (benchmarks/density.py).
"""

from __future__ import annotations

from stats import ratio

P_TARGETS = {
    "P1": "with SmolVM() as vm: vm.run('true') end to end >= 150x faster than the peer's cold "
    "start to first command (medians)",
    "P2": "warm run('true'): login shell within 15% of raw (medians); raw >= 8x faster than the "
    "peer's execute('true')",
    "P3": "cold boot to first command >= 12x faster than the peer's",
    "P4": "idle running sandbox <= 1% of a core (QEMU + helpers, restored/pooled/cold medians); "
    "idle RSS >= 10x below the peer's (restored sandbox vs its cold-booted one)",
    "P5": "--density N: 50 running sandboxes, run('true') p95 < 1 s while all are up; 200 paused",
    "P6": "import smolvm <= 100 ms and `smolvm list` <= 300 ms (medians)",
}


def _get(d: dict, *path: str) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d  # type: ignore[return-value]


def _at_least(v: float | None, limit: float) -> bool | None:
    return None if v is None else v >= limit


def _at_most(v: float | None, limit: float) -> bool | None:
    return None if v is None else v <= limit


def _all(*oks: bool | None) -> bool | None:
    """True if every part holds, None if one could not be measured."""
    return None if None in oks else all(oks)


def check(res: dict) -> dict:
    """``{P1..P6: {value, target, ok}}`` for a run's JSON (P5 only in density runs)."""
    o, p = res.get("ours", {}), res.get("peer", {})
    peer_cold = _get(p, "first_command_s", "median")
    out: dict[str, dict] = {}

    def put(key: str, value: object, ok: bool | None) -> None:
        out[key] = {"value": value, "target": P_TARGETS[key], "ok": ok}

    if o:
        p1 = ratio(peer_cold, _get(o, "restore", "total_s", "median"))
        put("P1", {"peer_over_ours": p1}, _at_least(p1, 150))
        login = _get(o, "warm_command_ms", "login", "median")
        raw = _get(o, "warm_command_ms", "raw", "median")
        over = round(login / raw, 3) if login and raw else None
        p2 = ratio(_get(p, "warm_command_ms", "median"), raw)
        login_ok, raw_ok = _at_most(over, 1.15), _at_least(p2, 8)
        value2 = {"login_over_raw": over, "peer_over_ours_raw": p2, "login_ok": login_ok, "raw_ok": raw_ok}
        put("P2", value2, _all(login_ok, raw_ok))
        p3 = ratio(peer_cold, _get(o, "cold_boot", "first_command_s", "median"))
        put("P3", {"peer_over_ours": p3}, _at_least(p3, 12))
        cpu = {k: _get(v, "median") for k, v in o.get("idle_cpu_percent_of_core", {}).items()}
        worst = max((c for c in cpu.values() if c is not None), default=None)
        ours_rss = _get(o, "idle_rss_mib", "restored", "VmRSS", "median")
        rss = ratio(_get(p, "idle_rss_mib", "VmRSS", "median"), ours_rss)
        cpu_ok, rss_ok = _at_most(worst, 1.0), _at_least(rss, 10)
        value4 = {"idle_cpu_percent_of_core": cpu, "cpu_ok": cpu_ok}
        value4.update(peer_rss_over_ours=rss, rss_ok=rss_ok)
        put("P4", value4, _all(cpu_ok, rss_ok))
    start = res.get("startup_ms")
    if start:
        imp = max(_get(start, k, "median") or 0 for k in ("import_smolvm", "from_smolvm_import_SmolVM"))
        lst = _get(start, "smolvm_list", "median")
        import_ok, list_ok = imp <= 100, bool(_at_most(lst, 300))
        value6 = {"import_ms": imp, "smolvm_list_ms": lst, "import_ok": import_ok, "list_ok": list_ok}
        put("P6", value6, import_ok and list_ok)
    if "density" in res:
        out["P5"] = res["density"]["target"]["P5"]
    return out
