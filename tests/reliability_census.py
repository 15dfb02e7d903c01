"""What SmolVM has on this host for one data dir, for the reliability suite: processes,
files, sockets, TAPs, nft rules, /dev/shm files and state rows, and how far the rows
disagree with reality."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

from smolvm import procs
from smolvm.paths import default_socket_dir


def processes(*needles: str) -> list[tuple[int, str]]:
    """(pid, argv0 basename) of live processes whose command line contains a needle."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if raw and any(n.encode() in raw for n in needles) and procs.is_alive(int(d.name)):
            out.append((int(d.name), os.path.basename(raw.split(b"\0")[0].decode(errors="replace"))))
    return out


def host_wide() -> dict[str, set[str]]:
    """TAP devices, SmolVM nft rules and /dev/shm files: diffed before/after a run."""
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout or "[]"
    taps = {ln["ifname"] for ln in json.loads(links) if ln["ifname"].startswith("smv-")}
    nft = subprocess.run(["nft", "-j", "list", "table", "inet", "smolvm"], capture_output=True, text=True)
    rules = set()
    if nft.returncode == 0:
        for item in json.loads(nft.stdout)["nftables"]:
            comment = item.get("rule", {}).get("comment", "")
            if comment.count(":") >= 2:  # smolvm:<vm_id>:<tap>: one VM's rules (not shared ones)
                rules.add(json.dumps(item["rule"], sort_keys=True))
    shm = {p for p in os.listdir("/dev/shm") if p.startswith("smolvm-")}
    return {"taps": taps, "nft_rules": rules, "shm": shm}


def _rows(data_dir: Path) -> dict[str, list]:
    db = sqlite3.connect(f"file:{data_dir / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        return {
            "vms": db.execute("SELECT vm_id, status, pid FROM vms").fetchall(),
            "resources": db.execute("SELECT vm_id, kind, value FROM resources").fetchall(),
            "ports": db.execute("SELECT port, vm_id FROM ports").fetchall(),
            "snapshots": db.execute("SELECT name, path FROM snapshots").fetchall(),
        }
    finally:
        db.close()


def census(data_dir: Path, before: dict[str, set[str]] | None = None) -> dict[str, int]:
    """Counts of what is left for ``data_dir`` (host-wide items relative to ``before``),
    and ``inconsistent``: rows that disagree with the host."""
    sock_dir = default_socket_dir(data_dir)
    rows = _rows(data_dir)
    live = processes(str(data_dir), str(sock_dir))
    vmms = [p for p in live if p[1].startswith("qemu-system")]
    vmm_ids = set()
    for pid, _ in vmms:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        vmm_ids.add(argv[argv.index(b"-name") + 1].decode().removeprefix("smolvm-"))
    ids = {r[0] for r in rows["vms"]}
    inconsistent = 0
    for vm_id, status, _pid in rows["vms"]:
        running = status in ("running", "paused")
        inconsistent += running != (vm_id in vmm_ids)
    inconsistent += len(vmm_ids - ids)  # a VMM nobody knows about
    inconsistent += sum(1 for r in rows["resources"] if r[0] not in ids)
    inconsistent += sum(1 for r in rows["ports"] if r[1] not in ids)
    inconsistent += sum(1 for _, path in rows["snapshots"] if not Path(path).exists())
    disks = list((data_dir / "disks").iterdir()) if (data_dir / "disks").exists() else []
    inconsistent += sum(1 for d in disks if d.stem not in ids)
    now = host_wide()
    before = before or {k: set() for k in now}
    return {
        "vmm_processes": len(vmms),
        "helper_processes": len(live) - len(vmms),
        "overlays": len(disks),
        "vm_dirs": len(list((data_dir / "vms").iterdir())) if (data_dir / "vms").exists() else 0,
        "sockets": len(list(sock_dir.iterdir())) if sock_dir.exists() else 0,
        "ports": len(rows["ports"]),
        "rows": len(rows["vms"]) + len(rows["resources"]),
        "taps": len(now["taps"] - before["taps"]),
        "nft_rules": len(now["nft_rules"] - before["nft_rules"]),
        "shm_files": len(now["shm"] - before["shm"]),
        "inconsistent": inconsistent,
    }
