"""README row and table of the distillation benchmark (bench/bench_distill.py).

    python -m bench.distill_readme bench/results/DATE-cpu-distill.json [--readme README.md]

Writes ``bench/results/DATE-cpu-distill.md`` (every implementation per shape: time, peak memory
above the baseline, both as ratios to naive torch, the loss check, provenance) and replaces the
text between ``<!-- distill:start -->`` and ``<!-- distill:end -->`` in README.md with one row per
shape: fk[cpu]'s time and extra peak memory against naive torch, Liger uncompiled and Liger
compiled, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Dict, List

from .report import _fmt_t
from .update_readme import REPO, replace_between

START, END = "<!-- distill:start -->", "<!-- distill:end -->"
PEERS = ("naive", "liger(compiled=False)", "liger")


def _by_shape(data: dict) -> Dict[tuple, Dict[str, dict]]:
    out: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        s = e["shape"]
        out[(s["n"], s["hs"], s["ht"], s["v"])][e["impl"]] = {"t": b["stats"]["min"], "mem": e["peak_mib"],
                                                              "check": e["check"], "prov": e["provenance"]}
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(data: dict) -> List[str]:
    lines = []
    for (n, hs, ht, v), impls in sorted(_by_shape(data).items()):
        base = impls.get("naive")
        lines += ["", f"N={n}, H_s={hs}, H_t={ht}, V={v}, fp32, generalised JSD (beta 0.5), forward+backward:", "",
                  "| implementation | time | time vs naive | extra peak memory | memory vs naive | loss check |",
                  "|---|---|---|---|---|---|"]
        for name, r in sorted(impls.items(), key=lambda kv: kv[1]["t"]):
            lines.append(f"| `{name}` | {_fmt_t(r['t'])} | {_ratio(r['t'], base['t']) if base else '-'} | "
                         f"{r['mem']:.0f} MiB | {_ratio(r['mem'], base['mem']) if base else '-'} | {r['check']} |")
    return lines


def readme_rows(data: dict, rel: str) -> List[str]:
    shapes = _by_shape(data)
    prov = next(iter(next(iter(shapes.values())).values()))["prov"]
    out = [f"Distillation (`fk.distill_loss`, generalised JSD, fp32, cpu backend), forward+backward, "
           f"**{prov['device']}**, {prov['date_utc'][:10]}, commit `{prov['git_commit']}`; `fk[cpu]` against "
           f"each peer in the same process (time ratio / extra-peak-memory ratio; full table: [`{rel}`]({rel})):", "",
           "| N x H_s x H_t x V | fk[cpu] time | vs naive torch (TRL JSD) | vs Liger compiled=False | vs Liger compiled |",
           "|---|---|---|---|---|"]
    for (n, hs, ht, v), impls in sorted(shapes.items()):
        fk = impls["fk[cpu]"]
        cells = [f"{_ratio(fk['t'], impls[p]['t'])} / {_ratio(fk['mem'], impls[p]['mem'])}" if p in impls else "-"
                 for p in PEERS]
        out.append(f"| {n} x {hs} x {ht} x {v} | {_fmt_t(fk['t'])} | " + " | ".join(cells) + " |")
    if prov.get("note"):
        out += ["", f"*{prov['note']}*"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    a = ap.parse_args(argv)
    with open(a.results) as f:
        data = json.load(f)
    md = a.results[:-5] + ".md"
    prov = data["benchmarks"][0]["extra_info"]["provenance"]
    with open(md, "w") as f:
        f.write("\n".join([f"# Distillation benchmark ({prov['date_utc'][:10]})", "",
                           f"Device: {prov['device']} ({prov['cpu_model']}, {prov['torch_threads']} torch threads); "
                           f"commit `{prov['git_commit']}`; torch {prov['versions'].get('torch')}, liger-kernel "
                           f"{prov['versions'].get('liger-kernel')}, trl {prov['versions'].get('trl')}.",
                           f"Command: `{prov['command']}`. Times: minimum over rounds; memory: peak RSS above the "
                           f"baseline of the first timed round (gradients included).", *table(data), ""]))
    rel = os.path.relpath(md, os.path.dirname(os.path.abspath(a.readme)))
    with open(a.readme) as f:
        text = f.read()
    with open(a.readme, "w") as f:
        f.write(replace_between(text, "\n".join(readme_rows(data, rel)), START, END))
    print(f"wrote {md} and the distillation rows of {a.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
