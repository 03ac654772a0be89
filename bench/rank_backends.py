"""Write ``fdiv_kernels/kernels/measured_ranking.json`` (what ``backend="auto"`` reads) from results.

    python -m bench.rank_backends [bench/results/*-gpu-check-*.json bench/results/*-cpu-*core.json ...]

* GPUs: for every device in the GPU check results (``scripts/gpu_check.py``), the fk backends whose
  one-pass rows ran correctly at the headline shape (``llama``: 8192 x 4096 x 128256 bf16,
  forward + backward) ordered by their best time.
* CPUs: for every CPU model in ``make bench`` results (pytest-benchmark JSON), the fk backends
  that ran every ``ce`` forward + backward case correctly (float32 and bf16), ordered by the
  geometric mean over those cases of their best time over the fastest fk backend's.

The newest result file of a device wins. Devices without results keep the cost-model priorities
(``fdiv_kernels/kernels/backends.py``).
"""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path
from typing import Dict, Iterable, List

from fdiv_kernels.kernels.backends import MEASURED_RANKING

HEADLINE = "llama"


def ranking_from(results: Iterable[Path]) -> Dict[str, dict]:
    devices: Dict[str, dict] = {}
    for path in sorted(results, key=lambda p: json.loads(p.read_text()).get("date_utc", "")):
        data = json.loads(path.read_text())
        rows = [r for r in data.get("headline", []) if r.get("shape") == HEADLINE and r.get("status") == "ok"
                and str(r.get("impl", "")).startswith("fk[") and str(r.get("check", "ok")).startswith("ok")]
        times = {r["impl"][3:-1]: r["t_min"] for r in rows if "-" not in r["impl"]}  # skip fk[triton-flash...]
        if times:
            devices[data.get("device", "unknown")] = {
                "order": sorted(times, key=times.get), "t_min_ms": {k: round(v * 1e3, 2) for k, v in times.items()},
                "source": path.name, "date_utc": data.get("date_utc")}
    return devices


def cpu_ranking_from(results: Iterable[Path]) -> Dict[str, dict]:
    devices: Dict[str, dict] = {}
    for path in sorted(results, key=lambda p: json.loads(p.read_text()).get("datetime", "")):
        data = json.loads(path.read_text())
        prov = data.get("fdiv", {}).get("provenance", {})
        if prov.get("device_type") != "cpu":
            continue
        cases: Dict[tuple, Dict[str, float]] = {}
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            case = info.get("case", {})
            if case.get("suite") != "ce" or case.get("mode") != "fwdbwd" or not case.get("impl", "").startswith("fk["):
                continue
            if info.get("check") != "ok":
                continue
            key = (case["n"], case["h"], case["v"], case["dtype"])
            cases.setdefault(key, {})[case["impl"][3:-1]] = b["stats"]["min"]
        names = set.intersection(*(set(t) for t in cases.values())) if cases else set()
        if len(names) < 1:
            continue
        score = {name: math.exp(sum(math.log(t[name] / min(t[m] for m in names)) for t in cases.values())
                                / len(cases)) for name in names}
        devices[prov.get("cpu_model", "unknown")] = {
            "order": sorted(score, key=score.get), "x_fastest": {k: round(v, 3) for k, v in score.items()},
            "cases": [f"{n}x{h}x{v} {dt}" for n, h, v, dt in sorted(cases)], "source": path.name,
            "date_utc": prov.get("date_utc")}
    return devices


def main(argv: List[str]) -> int:
    paths = [Path(p) for p in (argv or sorted(glob.glob("bench/results/*-gpu-check-*.json")
                                               + glob.glob("bench/results/*-cpu-*core.json")))]
    table = json.loads(MEASURED_RANKING.read_text()) if MEASURED_RANKING.exists() else {"devices": {}}
    gpu = [p for p in paths if "-gpu-check-" in p.name]
    table["devices"].update(ranking_from(gpu))
    table["devices"].update(cpu_ranking_from([p for p in paths if p not in gpu]))
    MEASURED_RANKING.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    for name, entry in table["devices"].items():
        print(f"{name}: {' > '.join(entry['order'])} ({entry['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
