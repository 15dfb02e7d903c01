"""The README's performance table, from a full ``run.py`` result and a ``--density`` one.

.venv/bin/python benchmarks/table.py results/full-<date>.json results/density-<date>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from targets import check


def _ms(s: dict, scale: float = 1000.0, nd: int = 0) -> str:
    """``median / p95`` of a summary (seconds unless ``scale`` says otherwise)."""
    if not s or not s.get("n"):
        return "n/a"
    f = f"{{:.{nd}f}}"
    return f"{f.format(s['median'] * scale)} / {f.format(s['p95'] * scale)}"


def _ok(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "ok" if ok else "**not met**"


def table(full: dict, dens: dict) -> str:
    o, p, t = full["ours"], full["peer"], check(full)  # the checks of targets.py, not copies
    d = dens["density"]
    pc = p["first_command_s"]["median"]
    cpu = o["idle_cpu_percent_of_core"]
    st = full["startup_ms"]
    rows = [
        ("| | SmolVM median / p95 | quicksand (median) | peer / ours | target | |"),
        "|---|---|---|---|---|---|",
        f'| P1 `with SmolVM() as vm: vm.run("true")` | {_ms(o["restore"]["total_s"])} ms | '
        f"{pc:.1f} s cold start | {t['P1']['value']['peer_over_ours']}x | ≥ 150x | {_ok(t['P1']['ok'])} |",
        f'| P2 warm `run("true")` | login {_ms(o["warm_command_ms"]["login"], 1, 2)} ms, '
        f"raw {_ms(o['warm_command_ms']['raw'], 1, 2)} ms | {p['warm_command_ms']['median']:.1f} ms | "
        f"login = {t['P2']['value']['login_over_raw']}x raw; raw {t['P2']['value']['peer_over_ours_raw']}x | "
        f"≤ 1.15x; ≥ 8x | {_ok(t['P2']['ok'])} |",
        f"| P3 cold boot → first command | {_ms(o['cold_boot']['first_command_s'], 1, 2)} s | {pc:.1f} s | "
        f"{t['P3']['value']['peer_over_ours']}x | ≥ 12x | {_ok(t['P3']['ok'])} |",
        f"| P4 idle CPU, restored / pooled / cold (% of a core) | {cpu['restored'].get('median')} / "
        f"{cpu['pooled'].get('median')} / {cpu['cold'].get('median')} | | | ≤ 1% | "
        f"{_ok(t['P4']['value']['cpu_ok'])} |",
        f"| P4 idle RSS, restored (VmRSS / PSS) | {o['idle_rss_mib']['restored']['VmRSS'].get('median')} / "
        f"{o['idle_rss_mib']['restored']['Pss'].get('median')} MiB | "
        f"{p['idle_rss_mib']['VmRSS']['median']} MiB | "
        f"{t['P4']['value']['peer_rss_over_ours']}x | ≥ 10x | "
        f"{_ok(t['P4']['value']['rss_ok'])} |",
        f'| P5 {d["running"]} running, `run("true")` | all at once {_ms(d["run_true_all_at_once_s"])} ms, '
        f"one by one {_ms(d['run_true_one_by_one_s'])} ms | | | p95 < 1 s | "
        f"{_ok(dens['wave2_targets']['P5']['ok'])} |",
        f"| P5 idle host cost of the {d['running']} | "
        f"{d['idle_running']['cpu_percent_of_core_all']}% of a core, "
        f"{d['idle_running']['host_mem_used_mib']} MiB | | | | |",
        f"| P5 {d['paused']} paused | {d['paused_host']['host_mem_used_mib']} MiB host memory "
        f"(PSS {d['paused_host']['pss_mib_all']} MiB); resumed sample answers in "
        f"{_ms(d['resume_and_run_true_sample_s'])} ms | | | 200 | {_ok(dens['wave2_targets']['P5']['ok'])} |",
        f"| P6 imports | `import smolvm` {_ms(st['import_smolvm'], 1, 0)} ms, `from smolvm import SmolVM` "
        f"{_ms(st['from_smolvm_import_SmolVM'], 1, 0)} ms | | | ≤ 100 ms | "
        f"{_ok(t['P6']['value']['import_ok'])} |",
        f"| P6 `smolvm list` (whole process) | {_ms(st['smolvm_list'], 1, 0)} ms | | | ≤ 300 ms | "
        f"{_ok(t['P6']['value']['list_ok'])} |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    full_path, dens_path = map(Path, sys.argv[1:3])
    print(table(json.loads(full_path.read_text()), json.loads(dens_path.read_text())))
