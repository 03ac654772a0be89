"""Turn a results JSON (pytest-benchmark + ``fdiv`` block) into a markdown report and PNG plots.

    python -m bench.report bench/results/2026-11-25-cpu2.json

Writes ``<stem>.md`` and ``<stem>-ce.png``, ``<stem>-scaling.png`` beside the JSON. Times are
the *minimum* over the rounds (the least disturbed by other processes on a shared machine) and
the median; ratios are against the naive eager baseline and against the bare GEMM floor (the
``gemm`` row: the same shape's 1 or 3 GEMMs without an epilogue) measured in the same process
(the same pytest run), never across runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

BASELINE = {"ce": "naive", "div": "fk(logits)", "dpo": "trl", "scaling": "naive"}


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "fdiv" not in data:
        raise ValueError(f"{path} is not an fdiv_kernels benchmark result (no 'fdiv' block)")
    return data


def rows(data: dict) -> List[dict]:
    """One flat dict per measured case, plus one per skipped case (``status`` = SKIPPED)."""
    out = []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "case" not in e:
            continue  # a suite not built on bench.harness (e.g. bench_cpu_backend.py): see other_rows()
        c = e["case"]
        out.append({**c, "status": "ok", "label": e.get("impl_label", ""), "t_min": b["stats"]["min"],
                    "t_median": b["stats"]["median"], "rounds": b["stats"]["rounds"], "peak_mib": e.get("peak_mib"),
                    "check": e.get("check", ""), "loss": e.get("loss"), "fused_backward": e.get("fused_backward"),
                    "shape": e.get("shape", ""), "mem_method": e.get("mem_method", "")})
    for s in data["fdiv"].get("skipped", []):
        out.append({**s, "status": "SKIPPED", "t_min": None, "t_median": None, "peak_mib": None,
                    "check": "", "shape": ""})
    return out


def other_rows(data: dict) -> List[str]:
    """Benchmarks from suites that do not use bench.harness, as a plain time table."""
    other = [b for b in data["benchmarks"] if "case" not in b["extra_info"]]
    if not other:
        return []
    lines = ["## Other benchmarks in this run", "", "| benchmark | time (min) | time (median) | rounds |", "|---|---|---|---|"]
    for b in sorted(other, key=lambda b: b["fullname"]):
        st = b["stats"]
        lines.append(f"| `{b['fullname']}` | {_fmt_t(st['min'])} | {_fmt_t(st['median'])} | {st['rounds']} |")
    return lines + [""]


def _group_key(r: dict):
    return (r["suite"], r["dtype"], r["n"], r["h"], r["v"], r["seq"], r["mode"], r["extra"].get("divergence", ""))


def _fmt_t(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_ratio(x: Optional[float], base: Optional[float]) -> str:
    if x is None or not base:
        return "-"
    return f"{x / base:.2f}"


def _shape_text(r: dict) -> str:
    rows_ = f"{r['n'] // r['seq']} rows x {r['seq']}" if r["seq"] else f"{r['n']} tokens"
    lab = r["extra"].get("shape_label", "")
    return f"{lab + ': ' if lab else ''}{rows_}, H={r['h']}, V={r['v']}, {r['dtype']}"


FLOOR = "gemm"
"""The bare GEMM floor row (bench.impls.GEMM_FLOOR): the "x GEMM floor" column divides by its time."""


def table(group: List[dict], baseline: str) -> List[str]:
    base = next((r for r in group if r["impl"] == baseline and r["status"] == "ok"), None)
    floor = next((r for r in group if r["impl"] == FLOOR and r["status"] == "ok"), None)
    bt = base["t_min"] if base else None
    bm = base["peak_mib"] if base else None
    ft = floor["t_min"] if floor else None
    lines = ["| implementation | time (min) | time (median) | time / " + baseline + " | x GEMM floor | peak MiB | mem / "
             + baseline + " | check |", "|---|---|---|---|---|---|---|---|"]
    ok = sorted((r for r in group if r["status"] == "ok"), key=lambda r: r["t_min"])
    for r in ok:
        name = f"`{r['impl']}`" + (" (grads in fwd)" if r.get("fused_backward") and r["mode"] == "fwd" else "")
        pm = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        lines.append(f"| {name}: {r['label']} | {_fmt_t(r['t_min'])} | {_fmt_t(r['t_median'])} | "
                     f"{_fmt_ratio(r['t_min'], bt)} | {_fmt_ratio(r['t_min'], ft)} | {pm} | "
                     f"{_fmt_ratio(r['peak_mib'], bm)} | {r['check']} |")
    for r in (r for r in group if r["status"] == "SKIPPED"):
        lines.append(f"| `{r['impl']}` | SKIPPED | | | | | | {r['reason']} |")
    return lines


def scaling_tables(srs: List[dict]) -> List[str]:
    """One table per sweep: a row per point, time and peak memory per implementation."""
    out = []
    for axis in ("tokens", "vocab"):
        pts = [r for r in srs if r["extra"].get("axis") == axis]
        if not pts:
            continue
        impls = sorted({r["impl"] for r in pts if r["status"] == "ok"})
        skipped = sorted({(r["impl"], r["reason"]) for r in pts if r["status"] == "SKIPPED"
                          and r["impl"] not in impls})
        xkey = "n" if axis == "tokens" else "v"
        fixed = f"H={pts[0]['h']}, " + (f"V={pts[0]['v']}" if axis == "tokens" else f"N={pts[0]['n']}")
        out += [f"### fwd+bwd against {'tokens N' if axis == 'tokens' else 'vocabulary V'} ({fixed}, {pts[0]['dtype']})", "",
                "| " + xkey.upper() + " | " + " | ".join(f"`{i}` time | `{i}` MiB" for i in impls) + " |",
                "|---|" + "---|---|" * len(impls)]
        for x in sorted({r[xkey] for r in pts}):
            cells = []
            for i in impls:
                r = next((r for r in pts if r[xkey] == x and r["impl"] == i), None)
                if r is None or r["status"] != "ok":
                    cells += ["skipped", "-"]
                else:
                    cells += [_fmt_t(r["t_min"]), f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"]
            out.append(f"| {x} | " + " | ".join(cells) + " |")
        reasons = sorted({r["reason"] for r in pts if r["status"] == "SKIPPED" and r["impl"] in impls})
        out += [""] + [f"- skipped points: {why}" for why in reasons]
        out += [f"- `{i}`: SKIPPED, {why}" for i, why in skipped] + [""]
    return out


def provenance_lines(data: dict) -> List[str]:
    p = data["fdiv"]["provenance"]
    v = p["versions"]
    out = [f"- device: **{p['device']}**" + ("" if p.get("device_type", "cpu") == "cpu" else
                                             f"; host CPU: {p['cpu_model']} ({p['cpu_count']} cores)"),
           "- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + (f", CUDA {p['cuda']}" if p.get("cuda") else ""),
           f"- git commit: `{p['git_commit']}`; date: {p['date_utc']}; profile: {data['fdiv']['profile']}",
           f"- command: `{p['command']}`",
           f"- memory: peak above the baseline taken right before the call ({data['fdiv']['mem_method']}); "
           f"see docs/benchmarks.md"]
    if p.get("loadavg_1_5_15_at_start"):
        out.append(f"- machine load average (1/5/15 min) at start {p['loadavg_1_5_15_at_start']}, at end "
                   f"{p['loadavg_1_5_15_at_end']} (2 cores: above 2 means other processes were competing)")
    if p.get("note"):
        out.append(f"- **note:** {p['note']}")
    return out


def plot_scaling(rs: List[dict], path: str, device: str) -> Optional[str]:
    sc = [r for r in rs if r["suite"] == "scaling" and r["status"] == "ok"]
    if not sc:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, axis in enumerate(("tokens", "vocab")):
        pts = [r for r in sc if r["extra"].get("axis") == axis]
        by_impl: Dict[str, List[dict]] = defaultdict(list)
        for r in pts:
            by_impl[r["impl"]].append(r)
        for impl, rr in sorted(by_impl.items()):
            rr.sort(key=lambda r: r["n"] if axis == "tokens" else r["v"])
            xs = [r["n"] if axis == "tokens" else r["v"] for r in rr]
            axes[0, col].plot(xs, [r["t_min"] for r in rr], "o-", label=impl)
            axes[1, col].plot(xs, [r["peak_mib"] for r in rr], "o-", label=impl)
        fixed = (f"H={pts[0]['h']}, V={pts[0]['v']}" if axis == "tokens" else f"H={pts[0]['h']}, N={pts[0]['n']}") if pts else ""
        for row, ylabel in enumerate(("time fwd+bwd (s)", "peak memory above inputs (MiB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N" if axis == "tokens" else "vocabulary V")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel.split(' (')[0]} vs {axis} ({fixed}, {pts[0]['dtype'] if pts else ''})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"fdiv_kernels scaling, {device}\n(naive stops where its logits would not fit the shared machine)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ce(rs: List[dict], path: str, device: str) -> Optional[str]:
    ce = [r for r in rs if r["suite"] == "ce" and r["status"] == "ok" and r["mode"] == "fwdbwd"]
    if not ce:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in ce:
        groups[_group_key(r)].append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for i, (key, g) in enumerate(sorted(groups.items())):
        g.sort(key=lambda r: r["impl"])
        names = [r["impl"] for r in g]
        axes[i, 0].barh(names, [r["t_min"] for r in g], color="tab:blue")
        axes[i, 0].set_xlabel("time fwd+bwd, min of rounds (s)")
        axes[i, 1].barh(names, [r["peak_mib"] or 0 for r in g], color="tab:orange")
        axes[i, 1].set_xlabel("peak memory above inputs (MiB)")
        axes[i, 0].set_title(_shape_text(g[0]), fontsize=9)
        axes[i, 1].set_title(_shape_text(g[0]), fontsize=9)
    fig.suptitle(f"cross-entropy head, forward+backward, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(rs: List[dict]) -> List[str]:
    """Headline ratios per ce group: the best fk backend against naive, the GEMM floor and the best peer."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rs:
        if r["suite"] == "ce" and r["status"] == "ok":
            groups[_group_key(r)].append(r)
    out = []
    for _, g in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        by = {r["impl"]: r for r in g}
        fk = [r for r in g if r["impl"].startswith("fk[")]
        peers = [r for r in g if not r["impl"].startswith("fk[") and r["impl"] not in (FLOOR, "naive")]
        if not fk or "naive" not in by:
            continue
        best = min(fk, key=lambda r: r["t_min"])
        nv = by["naive"]
        txt = (f"- {'fwd+bwd' if best['mode'] == 'fwdbwd' else 'fwd'}, {_shape_text(best)}: fastest fk backend "
               f"`{best['impl']}` at {best['t_min'] / nv['t_min']:.2f}x naive's time")
        if FLOOR in by:
            txt += f", {best['t_min'] / by[FLOOR]['t_min']:.2f}x the GEMM floor"
        if best["peak_mib"] and nv["peak_mib"]:
            lean = min(fk, key=lambda r: r["peak_mib"] or float("inf"))
            txt += f"; least memory `{lean['impl']}` at {lean['peak_mib'] / nv['peak_mib']:.2f}x naive's"
        if peers:
            p = min(peers, key=lambda r: r["t_min"])
            txt += f"; fastest peer `{p['impl']}` at {p['t_min'] / nv['t_min']:.2f}x time"
            if p["peak_mib"] and nv["peak_mib"]:
                txt += f", {p['peak_mib'] / nv['peak_mib']:.2f}x memory"
        out.append(txt + ".")
    return (["## Summary", ""] + out + [""]) if out else []


SUITE_TITLES = {
    "ce": "Cross-entropy head (the primitive): mean NLL over non-ignored tokens",
    "div": "f-divergence SFT losses (fk.loss, sequence level) vs the paper's literal forms",
    "dpo": "Sequence log-probs + sigmoid DPO loss",
    "scaling": "Scaling with tokens and vocabulary (fwd+bwd, one round per point)",
}


def render(data: dict, stem: str) -> str:
    rs = rows(data)
    device = data["fdiv"]["provenance"]["device"]
    base = os.path.basename(stem)
    lines = [f"# fdiv_kernels benchmarks: {device}", ""] + provenance_lines(data) + [""]
    lines += ["Times: minimum and median over the rounds, one call per round. Ratios: against the baseline "
              "named in the column, measured in the same run. Memory: peak above the inputs "
              "(gradients of hidden/weight included in fwd+bwd). `check`: the loss agrees with a float32 "
              "reference (naive torch / fk.loss(logits=) / TRL) within tolerance; literal paper forms are only "
              "checked for finiteness. SKIPPED rows give the reason.", ""]
    lines += summary(rs)
    ce_png = plot_ce(rs, stem + "-ce.png", device)
    sc_png = plot_scaling(rs, stem + "-scaling.png", device)
    for suite in ("ce", "div", "dpo", "scaling"):
        srs = [r for r in rs if r["suite"] == suite]
        if not srs:
            continue
        lines += [f"## {SUITE_TITLES[suite]}", ""]
        if suite == "ce" and ce_png:
            lines += [f"![ce]({base}-ce.png)", ""]
        if suite == "scaling":
            if sc_png:
                lines += [f"![scaling]({base}-scaling.png)", ""]
            lines += scaling_tables(srs)
            continue
        groups: Dict[tuple, List[dict]] = defaultdict(list)
        for r in srs:
            groups[_group_key(r)].append(r)
        for key, g in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
            ref = next((r for r in g if r["status"] == "ok"), g[0])
            title = f"{'fwd+bwd' if ref['mode'] == 'fwdbwd' else 'fwd'}, {_shape_text(ref)}"
            if ref["extra"].get("divergence"):
                title = f"{ref['extra']['divergence']}: " + title
            lines += [f"### {title}", ""] + table(g, BASELINE[suite]) + [""]
    lines += other_rows(data)
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[0]
    data = load(path)
    stem = path[:-5] if path.endswith(".json") else path
    md = render(data, stem)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(f"wrote {stem}.md (+ plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
