"""Write ``fdiv_kernels/kernels/measured_ranking.json`` (what ``backend="auto"`` reads) from GPU results.

    python -m bench.rank_backends [bench/results/*-gpu-check-*.json ...]

For every device in the GPU check results (``scripts/gpu_check.py``), the fk backends whose
one-pass rows ran correctly at the headline shape (``llama``: 8192 x 4096 x 128256 bf16,
forward + backward) ordered by their best time; the newest result file of a device wins. Devices
without results keep the cost-model priorities (``fdiv_kernels/kernels/backends.py``).
"""

from __future__ import annotations

import glob
import json
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


def main(argv: List[str]) -> int:
    paths = [Path(p) for p in (argv or sorted(glob.glob("bench/results/*-gpu-check-*.json")))]
    table = json.loads(MEASURED_RANKING.read_text()) if MEASURED_RANKING.exists() else {"devices": {}}
    table["devices"].update(ranking_from(paths))
    MEASURED_RANKING.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    for name, entry in table["devices"].items():
        print(f"{name}: {' > '.join(entry['order'])} ({entry['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
