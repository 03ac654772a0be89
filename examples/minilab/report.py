"""The mini-lab report: ``docs/results.md`` and its figures, generated from ``results.json``.

Every number in the markdown comes from the results dict written by ``run.py``; the verdict rules
live in :mod:`stats` (an effect with the paper's sign beyond ``stats.Z`` standard errors is
"reproduced", the opposite sign beyond it "not reproduced", anything else "inconclusive").
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import stability
import stats

# ----------------------------------------------------------------------------------------------
# Reading the results
# ----------------------------------------------------------------------------------------------


def runs_of(res: Dict, key: str) -> List[Dict]:
    """The per-seed records of an arm, in seed order (JSON turns the seed keys into strings)."""
    arm = res["arms"].get(key, {})
    return [arm[k] for k in sorted(arm, key=int)]


def acc(r: Dict, phase: str, split: str, fmt: str = "chat") -> float:
    return r[phase][split][fmt]["all"]


def overall(r: Dict, phase: str) -> float:
    """Accuracy on all held-out prompts (seen and unseen sets have the same size)."""
    return 0.5 * (acc(r, phase, "seen") + acc(r, phase, "unseen"))


def kl_base(r: Dict, phase: str) -> float:
    return 0.5 * (r[phase]["seen"]["kl_base"] + r[phase]["unseen"]["kl_base"])


def forgetting(res: Dict, r: Dict, phase: str) -> float:
    """Drop of plain-format accuracy on the unseen (never post-trained) prompts, base minus model."""
    return res["base"]["eval"]["unseen"]["plain"]["all"] - acc(r, phase, "unseen", "plain")


def n_prompts(res: Dict) -> int:
    return res["sizes"]["n_eval"] * 4 * 2  # 4 tasks, seen + unseen


def lr_keys(res: Dict) -> List[str]:
    return [f"lr={lr:g}" for lr in res["sft_lrs"] if f"lr={lr:g}" in res["arms"]]


def std_key(res: Dict) -> str:
    return f"lr={res['standard_lr']:g}"


def compare(res: Dict, a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Difference of mean accuracies and its sampling error: Welch over seeds combined with the
    binomial error of the fixed held-out prompt set (treated as independent: conservative)."""
    d, se = stats.diff(a, b)
    n = n_prompts(res)
    pa, pb = statistics.mean(a), statistics.mean(b)
    binom = math.sqrt(stats.binomial_se(pa, n) ** 2 + stats.binomial_se(pb, n) ** 2)
    return d, math.sqrt(se ** 2 + binom ** 2)


def pm(d: float, se: float, digits: int = 3) -> str:
    return f"{d:+.{digits}f} ± {stats.Z * se:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

ARM_HEAD = ("| run | SFT stop / budget | held-out SFT NLL | SFT acc seen | SFT acc unseen | DPO acc seen | "
            "DPO acc unseen | DPO acc all | KL(SFT, base) | KL(DPO, base) | forgetting SFT | forgetting DPO |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")


def arm_row(res: Dict, label: str, rs: List[Dict]) -> str:
    stop = stats.fmt([r["sft_best_step"] for r in rs], 0) + f" / {rs[0]['sft_steps']}"
    cells = [stop, stats.fmt([r["sft_heldout_nll"] for r in rs]),
             stats.fmt([acc(r, "sft", "seen") for r in rs]), stats.fmt([acc(r, "sft", "unseen") for r in rs]),
             stats.fmt([acc(r, "dpo", "seen") for r in rs]), stats.fmt([acc(r, "dpo", "unseen") for r in rs]),
             stats.fmt([overall(r, "dpo") for r in rs]),
             stats.fmt([kl_base(r, "sft") for r in rs], 2), stats.fmt([kl_base(r, "dpo") for r in rs], 2),
             stats.fmt([forgetting(res, r, "sft") for r in rs]), stats.fmt([forgetting(res, r, "dpo") for r in rs])]
    return f"| {label} | " + " | ".join(cells) + " |"


def base_table(res: Dict) -> str:
    rows = ["| model | chat acc seen | chat acc unseen | plain acc seen | plain acc unseen | held-out SFT NLL |",
            "|---|---|---|---|---|---|"]
    for label, key in (("base (pretrained)", "base"), ("other-prior base (Sec. 4.4)", "base_other")):
        b = res.get(key)
        if b:
            e = b["eval"]
            rows.append(f"| {label} | {e['seen']['chat']['all']:.3f} | {e['unseen']['chat']['all']:.3f} | "
                        f"{e['seen']['plain']['all']:.3f} | {e['unseen']['plain']['all']:.3f} | "
                        f"{b['heldout_nll']:.3f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------


def claim_lr(res: Dict) -> Optional[Dict]:
    """Sec. 4.2: each rate below the standard one vs the standard one, post-DPO accuracy (all prompts)."""
    keys = lr_keys(res)
    std = std_key(res)
    if len(keys) < 2 or std not in keys:
        return None
    dpo = {k: [overall(r, "dpo") for r in runs_of(res, k)] for k in keys}
    smaller = [k for k in keys if float(k[3:]) < res["standard_lr"]]
    comps = {k: compare(res, dpo[k], dpo[std]) for k in smaller}
    per = {k: stats.verdict(*comps[k]) for k in smaller}
    if any(v == "reproduced" for v in per.values()) and not any(v == "not reproduced" for v in per.values()):
        v = "reproduced"
    elif any(v == "not reproduced" for v in per.values()) and not any(v == "reproduced" for v in per.values()):
        v = "not reproduced"
    else:
        v = "inconclusive"
    xs, ys, kls, fg = [], [], [], []
    for k in keys:
        for r in runs_of(res, k):
            xs.append(math.log10(float(k[3:])))
            ys.append(overall(r, "dpo"))
            kls.append(kl_base(r, "sft"))
            fg.append(forgetting(res, r, "sft"))
    trend = {"dpo_acc": stats.slope(xs, ys), "kl_sft": stats.slope(xs, kls), "forgetting_sft": stats.slope(xs, fg)}
    best = max(keys, key=lambda k: statistics.mean(dpo[k]))
    sft_best = min(keys, key=lambda k: statistics.mean(r["sft_heldout_nll"] for r in runs_of(res, k)))
    larger = {k: compare(res, dpo[k], dpo[std]) for k in keys if float(k[3:]) > res["standard_lr"]}
    measured = "; ".join(f"{k[3:]} vs {std[3:]}: {pm(*comps[k])} ({per[k]})" for k in smaller)
    return {"verdict": v, "measured": measured, "comps": comps, "per": per, "trend": trend, "best": best,
            "dpo": dpo, "smaller": smaller, "larger": larger, "sft_best": sft_best}


def claim_mechanism(res: Dict) -> Optional[Dict]:
    """Sec. 3.2 / 4.2, the reason for the claim: without a KL gradient, a larger SFT step moves the model
    further from the base and forgets what it knew (slopes per decade of rate, over every seed)."""
    c = claim_lr(res)
    if not c:
        return None
    kl, fg = c["trend"]["kl_sft"], c["trend"]["forgetting_sft"]
    v = stats.verdict(*fg)
    return {"verdict": v, "measured": f"per decade of SFT rate: forgetting after SFT {pm(*fg)}, KL(SFT, base) "
                                      f"{pm(*kl, 2)} nats (slopes ± {stats.Z:g} SE over {len(res['seeds']) * len(lr_keys(res))} runs)"}


def claim_div(res: Dict) -> Optional[Dict]:
    """Sec. 4.3: Pearson / squared Hellinger vs NLL at the standard rate: weaker SFT, better post-DPO."""
    ref = std_key(res)
    if ref not in res["arms"]:
        return None
    nll = runs_of(res, ref)
    out = {}
    for d in ("pearson", "squared_hellinger"):
        rs = runs_of(res, f"div={d}")
        if not rs:
            continue
        sft = compare(res, [overall(r, "sft") for r in rs], [overall(r, "sft") for r in nll])
        dpo = compare(res, [overall(r, "dpo") for r in rs], [overall(r, "dpo") for r in nll])
        out[d] = {"sft": sft, "dpo": dpo, "sft_verdict": stats.verdict(*sft, expected_sign=-1),
                  "dpo_verdict": stats.verdict(*dpo)}
    if not out:
        return None
    vs = [o["dpo_verdict"] for o in out.values()]
    v = ("reproduced" if all(x == "reproduced" for x in vs) else
         "not reproduced" if all(x == "not reproduced" for x in vs) or
         ("not reproduced" in vs and "reproduced" not in vs) else "inconclusive")
    measured = "; ".join(f"{d}: SFT acc {pm(*o['sft'])} ({o['sft_verdict']}), post-DPO {pm(*o['dpo'])} "
                         f"({o['dpo_verdict']})" for d, o in out.items())
    return {"verdict": v, "measured": measured, "per": out}


def claim_values(res: Dict) -> Optional[Dict]:
    """Sec. 4.4: V(s) rankings agree between SFT models (different shards; a different prior)."""
    shards = [r for r in runs_of(res, std_key(res)) if "values" in r]
    other = [r for r in runs_of(res, "prior=other") if "values" in r]
    pairs = []
    for i in range(len(shards)):
        for j in range(i + 1, len(shards)):
            pairs.append(("same base, shards %d/%d" % (shards[i]["shard"], shards[j]["shard"]),
                          stats.kendall_tau(shards[i]["values"], shards[j]["values"])))
    divs = [r for d in res.get("divergences", []) for r in runs_of(res, f"div={d}")[:1] if "values" in r]
    if shards:
        for r in divs:
            pairs.append((f"same base, NLL vs {r['key'][4:]}", stats.kendall_tau(shards[0]["values"], r["values"])))
        for r in other:
            for s in shards:
                pairs.append((f"other prior vs shard {s['shard']}", stats.kendall_tau(r["values"], s["values"])))
    if not pairs:
        return None
    taus = [t for _, (t, _) in pairs]
    se = max(s for _, (_, s) in pairs)
    shard_t = [t for name, (t, _) in pairs if "shards" in name]
    other_t = [t for name, (t, _) in pairs if "other prior" in name]
    pos = all(t > stats.Z * s for _, (t, s) in pairs)
    ordered = not (shard_t and other_t) or statistics.mean(shard_t) > statistics.mean(other_t)
    neg = any(t < -stats.Z * s for _, (t, s) in pairs)
    v = "reproduced" if pos and ordered else "not reproduced" if neg else "inconclusive"
    measured = (f"Kendall tau, shards: {stats.fmt(shard_t, 2)}; other prior: {stats.fmt(other_t, 2)}; "
                f"all {len(pairs)} pairs in [{min(taus):.2f}, {max(taus):.2f}] (null SE {se:.3f})")
    return {"verdict": v, "measured": measured, "pairs": pairs, "shard_taus": shard_t,
            "n_states": len(shards[0]["values"]) if shards else 0}


def claim_alignment(res: Dict) -> Optional[Dict]:
    """Sec. 4.4 (Fig. 2b): a lower held-out alignment DPO loss (implicit reward vs held-out preferences)
    goes with a better model. Over every run on the main base: the SFT model's loss against its own
    accuracy (the verdict) and against the post-DPO accuracy."""
    xs, ys, zs = [], [], []
    for key in res["arms"]:
        if key.startswith("prior="):  # another base: its alignment loss has another reference
            continue
        for r in runs_of(res, key):
            if r.get("sft_align_dpo_loss") is not None:
                xs.append(r["sft_align_dpo_loss"])
                ys.append(overall(r, "sft"))
                zs.append(overall(r, "dpo"))
    if len(xs) < 5:
        return None
    rho, se = stats.spearman(xs, ys)
    rho_dpo, se_dpo = stats.spearman(xs, zs)
    v = stats.verdict(rho, se, expected_sign=-1)
    return {"verdict": v, "x": xs, "y": ys, "z": zs, "rho": rho, "rho_dpo": rho_dpo,
            "measured": f"Spearman rho {rho:+.2f} ± {stats.Z * se:.2f} with the SFT accuracy over {len(xs)} runs "
                        f"({rho_dpo:+.2f} ± {stats.Z * se_dpo:.2f} with the post-DPO accuracy)"}


def claim_v0(res: Dict) -> Optional[Dict]:
    """Sec. 4.5: V(s0) rises during SFT and settles within ~150 steps."""
    rows = []
    for key in res["arms"]:
        for r in runs_of(res, key):
            c = r["curves"]
            s = stats.first_settled(c["step"], c["value_s0"])
            if s["settled_step"] is not None:
                rows.append((key, r["seed"], s))
    if not rows:
        return None
    rises = [s["rise"] for _, _, s in rows]
    m, sd = stats.mean_sd(rises)
    rise_v = stats.verdict(m, sd / math.sqrt(len(rises)))
    settled = [s["settled_step"] for _, _, s in rows]
    reached = [s["reached_step"] for _, _, s in rows if s["reached_step"] is not None]
    early = sum(x <= 150 for x in settled) / len(settled)
    if rise_v == "reproduced" and early >= 2 / 3:
        v = "reproduced"
    elif rise_v == "not reproduced" or early <= 1 / 3:
        v = "not reproduced"
    else:
        v = "inconclusive"
    q = statistics.quantiles(settled, n=4) if len(settled) > 1 else [settled[0]] * 3
    measured = (f"rise {m:+.2f} ± {stats.Z * sd / math.sqrt(len(rises)):.2f} nats ({rise_v}); 90% of the rise by step "
                f"{statistics.median(reached):.0f}, settled from step {statistics.median(settled):.0f} (medians; settled "
                f"quartiles {q[0]:.0f}-{q[2]:.0f}); {100 * early:.0f}% of {len(settled)} runs settled by step 150")
    return {"verdict": v, "measured": measured, "rows": rows, "early": early, "settled": settled}


def claim_stability(stab: Optional[Dict]) -> Optional[Dict]:
    """Sec. 5.2: the literal KL/JS forms fail (NaN/Inf or |loss| > 1e6) where ``fk.loss`` does not."""
    if not stab:
        return None
    runs = stab["runs"]
    fk = [r for r in runs if "fk.loss" in r["method"]]
    lit = [r for r in runs if r["method"] != "nll" and "fk.loss" not in r["method"]]
    fk_bad = [r for r in fk if r["bad_step"] is not None]
    lit_bad = [r for r in lit if r["bad_step"] is not None]
    where = sorted({f"{r['method']} ({r['reference']})" for r in lit_bad})
    v = "reproduced" if lit_bad and not fk_bad else "not reproduced" if fk_bad and not lit_bad else "inconclusive"
    return {"verdict": v, "where": where,
            "measured": f"literal KL/JS forms failed in {len(lit_bad)}/{len(lit)} runs"
                        + (f" ({', '.join(where)})" if where else "") + f"; fk.loss in {len(fk_bad)}/{len(fk)}"}


def claim_mix(res: Dict) -> Optional[Dict]:
    mix, ref = runs_of(res, "mix_dpo"), runs_of(res, std_key(res))
    if not mix or not ref:
        return None
    d, se = compare(res, [overall(r, "dpo") for r in mix], [overall(r, "dpo") for r in ref])
    v = stats.verdict(d, se, expected_sign=-1)
    return {"verdict": v, "measured": f"post-DPO acc, mixture minus plain SFT: {pm(d, se)}", "d": d, "se": se}


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr(res: Dict, path: str) -> None:
    plt = _plt()
    keys = lr_keys(res)
    lrs = [float(k[3:]) for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("SFT, seen", lambda r: acc(r, "sft", "seen"), "C0", "--"),
              ("SFT, unseen", lambda r: acc(r, "sft", "unseen"), "C0", ":"),
              ("DPO, seen", lambda r: acc(r, "dpo", "seen"), "C1", "--"),
              ("DPO, unseen", lambda r: acc(r, "dpo", "unseen"), "C1", ":"),
              ("DPO, all", lambda r: overall(r, "dpo"), "C1", "-")]
    for label, f, c, ls in series:
        ys = [[f(r) for r in runs_of(res, k)] for k in keys]
        axes[0].plot(lrs, [statistics.mean(y) for y in ys], color=c, ls=ls, label=label)
        for lr, y in zip(lrs, ys):
            axes[0].scatter([lr] * len(y), y, color=c, s=8)
    for ax, f, yl in ((axes[1], kl_base, "KL(pi || base) per token, held-out plain text"),
                      (axes[2], lambda r, p: forgetting(res, r, p), "forgetting: base - model plain acc, unseen")):
        for p, c in (("sft", "C0"), ("dpo", "C1")):
            ys = [[f(r, p) for r in runs_of(res, k)] for k in keys]
            ax.plot(lrs, [statistics.mean(y) for y in ys], color=c, label=f"after {p.upper()}")
            for lr, y in zip(lrs, ys):
                ax.scatter([lr] * len(y), y, color=c, s=8)
        ax.set_ylabel(yl, fontsize=8)
    axes[0].set_ylabel("greedy accuracy (chat template)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("SFT learning rate")
        ax.axvline(res["standard_lr"], color="grey", lw=0.6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(res: Dict, path: str) -> None:
    """Held-out SFT NLL along SFT per rate (mean and range over seeds), early-stopping steps marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    base_nll = res["base"]["heldout_nll"]
    for i, k in enumerate(lr_keys(res)):
        rs = runs_of(res, k)
        steps = rs[0]["curves"]["eval_step"][1:]
        ys = [[base_nll - v for v in r["curves"]["heldout_logratio"][1:]] for r in rs]
        mean = [statistics.mean(col) for col in zip(*ys)]
        ax.plot(steps, mean, color=f"C{i}", label=k)
        ax.fill_between(steps, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], color=f"C{i}", alpha=0.2)
        for r in rs:
            j = r["curves"]["eval_step"].index(r["sft_best_step"])
            ax.scatter([r["sft_best_step"]], [base_nll - r["curves"]["heldout_logratio"][j]], color=f"C{i}", marker="v")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("held-out SFT NLL per token (v = early stop)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_div(res: Dict, keys: List[Tuple[str, str]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    x = list(range(len(keys)))
    for i, (p, c) in enumerate((("sft", "C0"), ("dpo", "C1"))):
        for ax, f in ((axes[0], lambda r: overall(r, p)), (axes[1], lambda r: kl_base(r, p))):
            vals = [[f(r) for r in runs_of(res, k)] for k, _ in keys]
            ax.bar([j + 0.4 * i - 0.2 for j in x], [statistics.mean(v) for v in vals], width=0.4, color=c,
                   label=f"after {p.upper()}")
            for j, v in enumerate(vals):
                ax.scatter([j + 0.4 * i - 0.2] * len(v), v, color="k", s=6)
    for ax, yl in zip(axes, ("accuracy, all held-out prompts", "KL(pi || base) per token")):
        ax.set_xticks(x)
        ax.set_xticklabels([label for _, label in keys], rotation=20, fontsize=8)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_values(res: Dict, cv: Dict, ca: Optional[Dict], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    shards = [r for r in runs_of(res, std_key(res)) if "values" in r]
    other = [r for r in runs_of(res, "prior=other") if "values" in r]
    if len(shards) > 1:
        axes[0].scatter(shards[0]["values"], shards[1]["values"], s=3, alpha=0.5, label="shard 0 vs shard 1")
    if other and shards:
        axes[0].scatter(shards[0]["values"], other[0]["values"], s=3, alpha=0.5, label="shard 0 vs other prior")
    axes[0].set_xlabel("V(s) of the SFT model, shard 0 (logsumexp of logits)")
    axes[0].set_ylabel("V(s) of another SFT model")
    axes[0].legend(fontsize=7)
    if ca:
        axes[1].scatter(ca["x"], ca["y"], s=10, label=f"SFT model (rho {ca['rho']:+.2f})")
        axes[1].scatter(ca["x"], ca["z"], s=10, label=f"after DPO (rho {ca['rho_dpo']:+.2f})")
        axes[1].set_xlabel("held-out alignment DPO loss of the SFT model (vs base)")
        axes[1].set_ylabel("accuracy, all held-out prompts")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_v0(res: Dict, path: str) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, k in enumerate(lr_keys(res)):
        rs = runs_of(res, k)
        for j, r in enumerate(rs):
            c = r["curves"]
            a1.plot(c["step"], c["value_s0"], color=f"C{i}", lw=0.8, alpha=0.7, label=k if j == 0 else None)
            s = stats.first_settled(c["step"], c["value_s0"])
            if s["settled_step"] is not None:
                a1.axvline(s["settled_step"], color=f"C{i}", lw=0.5, ls=":")
            if "acc_step" in c:
                a2.plot(c["acc_step"], c["acc_seen"], color=f"C{i}", ls="--", label=f"{k} seen")
                a2.plot(c["acc_step"], c["acc_unseen"], color=f"C{i}", ls=":", label=f"{k} unseen")
    a1.axvline(150, color="k", lw=0.8, label="step 150 (paper)")
    a1.set_xlabel("SFT step")
    a1.set_ylabel("V(s0): logsumexp at the first answer position")
    a1.legend(fontsize=7)
    a2.set_xlabel("SFT step")
    a2.set_ylabel("greedy accuracy along SFT (seed 0)")
    a2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _header(res: Dict) -> List[str]:
    m = res["meta"]
    sizes = res["sizes"]
    cpu = m.get("worker_cpu_s")
    loads = m.get("load_samples")
    timing = (f"{m['wall_s'] / 60:.1f} min wall clock with {m['jobs']} worker process(es) of one thread each on "
              f"{m['cpus']} CPU cores, ")
    if loads:
        timing += (f"1-minute load average {statistics.mean(loads):.1f} on average (max {max(loads):.1f}) at the "
                   f"end of each of its {len(loads) - 1} jobs, this run's {m['jobs']} workers included")
    else:
        timing += (f"1-minute load average {m['load_start'][0]:.1f} at the start and {m['load_end'][0]:.1f} at the end "
                   f"(15-minute: {m['load_end'][2]:.1f})")
    if cpu:
        share = cpu / (m["jobs"] * m["wall_s"])
        timing += (f"; the workers used {cpu / 60:.1f} CPU-minutes, {100 * share:.0f}% of {m['jobs']} cores over that "
                   f"time, so on a quiet machine (a core per worker) the run takes about {cpu / m['jobs'] / 60:.0f} min")
    again = f" Report rewritten from its results.json by `{m['report_command']}`." if m.get("report_command") else ""
    return [
        "# Mini-lab results", "",
        f"Generated by `{m['command']}` on {m['date']}: {timing} (torch {torch.__version__}).{again} "
        f"Seeds {res['seeds']}: seed k trains on SFT shard k with data order k. Cells: mean ± sd over seeds. "
        f"Verdicts: effect ± {stats.Z:g} x sampling error (seeds, Welch, combined with the binomial error of the "
        f"{n_prompts(res)} fixed held-out prompts); 'reproduced' = the paper's sign beyond it, 'not reproduced' = "
        "the opposite sign beyond it, otherwise 'inconclusive'.", "",
        "Do not edit by hand: `make minilab` rewrites this file (design: [minilab/README.md](minilab/README.md)).", "",
        "## The regime (v2): a base whose prior matters", "",
        f"A tiny Llama (0.17M parameters) is pretrained for {sizes['pretrain_steps']} steps on four tasks (add, reverse, "
        "sort, count) in a plain format (`sort 591=159`), mixed with chat-template conversations on other content, "
        "until it answers the tasks in that format. SFT data teaches the chat template on a subset of the problems "
        "only (the *SFT domain*: sums with a first operand <= 4, strings over `abcd`, digits 0-4, counts without `c`). "
        f"Held-out prompts: {sizes['n_eval'] * 4} *seen* (SFT domain) and {sizes['n_eval'] * 4} *unseen* (outside it: "
        "knowledge only the base supplies). DPO (the same for every run, from the SFT checkpoint, reference = that "
        "checkpoint, on-policy rejected answers, plus an NLL term) uses pairs from the whole problem space. "
        f"SFT runs {sizes['sft_steps']} steps at every rate with a checkpoint every {sizes['sft_every']}; DPO starts "
        "from the checkpoint with the lowest held-out SFT loss (validation prompts of the SFT domain). KL(pi, base): "
        "exact per-token KL over the vocabulary on held-out plain text. Forgetting: the base's plain-format accuracy "
        "on the unseen prompts minus the model's.", "", base_table(res), ""]


def _verdicts(claims: Dict[str, Optional[Dict]]) -> List[str]:
    names = {
        "lr": ("4.2", "a smaller SFT learning rate gives a better post-DPO model"),
        "mechanism": ("3.2, 4.2", "why: with no KL gradient, a larger SFT rate drifts from the base and forgets"),
        "div": ("4.3", "Pearson / squared-Hellinger SFT: weaker SFT, better post-DPO than NLL"),
        "values": ("4.4", "logits are values: V(s) rankings agree across models"),
        "align": ("4.4", "lower implicit-reward alignment loss goes with a better model"),
        "v0": ("4.5", "V(s0) rises during SFT and settles within ~150 steps"),
        "stability": ("5.2", "literal KL / JS objectives are numerically unstable"),
        "mix": ("App. D", "SFT + lambda*DPO with adaptive lambda does not help"),
    }
    rows = ["## Verdicts", "", "| paper | claim | measured here | verdict |", "|---|---|---|---|"]
    for k, (sec, text) in names.items():
        c = claims.get(k)
        if c:
            rows.append(f"| Sec. {sec} | {text} | {c['measured']} | **{c['verdict']}** |")
    return rows + [""]


def _lr_section(res: Dict, c: Dict, files: Dict[str, str], rel) -> List[str]:
    std = std_key(res)
    L = ["## 1. SFT learning rate, then the same DPO (paper Sec. 4.2)", "",
         f"![lr sweep]({rel(files['lr'])})", "", f"![SFT convergence]({rel(files['conv'])})", "", ARM_HEAD]
    L += [arm_row(res, k + (" (standard)" if k == std else ""), runs_of(res, k)) for k in lr_keys(res)]
    ctrl = [k for k in res["arms"] if k.startswith("lr=") and k.endswith(" x2")]
    for k in ctrl:
        rs = runs_of(res, k)
        L.append(arm_row(res, f"{k[3:-3]}, twice the budget (seed {rs[0]['seed']})", rs))
    t = c["trend"]
    conv = []
    for k in lr_keys(res):
        last = []
        for r in runs_of(res, k):
            cur = r["curves"]
            steps, lr_ = cur["eval_step"], cur["heldout_logratio"]
            i0 = max(0, len(steps) - 1 - max(1, 100 // res["sizes"]["sft_every"]))
            last.append(lr_[-1] - lr_[i0])
        conv.append(f"{k[3:]}: {stats.fmt(last)}")
    ctrl_txt = ""
    for k in ctrl:
        twice = runs_of(res, k)[0]
        once = next(r for r in runs_of(res, k[:-3]) if r["seed"] == twice["seed"])
        ctrl_txt += (f" Convergence control: rate {k[3:-3]} with twice the budget (seed {twice['seed']}) stops at step "
                     f"{twice['sft_best_step']} with held-out SFT NLL {twice['sft_heldout_nll']:.3f} (one budget: "
                     f"{once['sft_heldout_nll']:.3f}) and post-DPO accuracy {overall(twice, 'dpo'):.3f} (one budget: "
                     f"{overall(once, 'dpo'):.3f}; one run's binomial error "
                     f"± {stats.Z * stats.binomial_se(overall(once, 'dpo'), n_prompts(res)):.3f}).")
    larger = "; ".join(f"{k[3:]} vs {std[3:]}: {pm(*d)}" for k, d in c["larger"].items())
    L += ["",
          f"Finding: best post-DPO accuracy at {c['best']}; the lowest held-out SFT loss at {c['sft_best']} "
          f"({'the standard rate' if c['sft_best'] == std else 'not the standard rate'}). Against the standard rate "
          f"{std[3:]}: {c['measured']}"
          + (f"; larger rates: {larger}" if larger else "") + f". Verdict (smaller rates only): **{c['verdict']}**. "
          "Trend over the whole sweep (slope per decade of learning rate, ± "
          f"{stats.Z:g} SE): post-DPO accuracy {pm(*t['dpo_acc'])}, KL(SFT, base) {pm(*t['kl_sft'], 2)} nats, "
          f"forgetting after SFT {pm(*t['forgetting_sft'])}. Convergence: held-out SFT NLL change over the last 100 "
          "steps of the budget (nats per token; positive = still improving): " + "; ".join(conv) + "." + ctrl_txt, ""]
    return L


def _div_section(res: Dict, c: Optional[Dict], files: Dict[str, str], rel) -> List[str]:
    std = std_key(res)
    keys = [(std, "NLL (tv)")] + [(f"div={d}", d) for d in res["divergences"] if f"div={d}" in res["arms"]]
    L = ["## 2. Divergences as the SFT objective (paper Sec. 4.3, Table 3)", "",
         f"All at SFT learning rate {res['standard_lr']:g}, beta 0.1, reference = the base.", "",
         f"![divergences]({rel(files['div'])})", "", ARM_HEAD]
    L += [arm_row(res, label, runs_of(res, k)) for k, label in keys if runs_of(res, k)]
    if c:
        nll = [overall(r, "dpo") for r in runs_of(res, std)]
        every = "; ".join(f"{label} {pm(*compare(res, [overall(r, 'dpo') for r in runs_of(res, k)], nll))}"
                          for k, label in keys[1:])
        L += ["", f"Finding (paper: weaker SFT, better post-DPO): {c['measured']}. Verdict: **{c['verdict']}**. "
                  f"Post-DPO accuracy minus NLL's for every objective: {every}. KL and JS, which the paper could "
                  "not train (Sec. 5.2), trained to a finite loss here.", ""]
    return L


def _values_section(res: Dict, cv: Optional[Dict], ca: Optional[Dict], files, rel) -> List[str]:
    L = ["## 3. Logits as values (paper Sec. 4.4)", "", f"![values]({rel(files['values'])})", ""]
    if cv:
        L += [f"V(s) = logsumexp of the logits at each of {cv['n_states']} answer positions of held-out prompts "
              "(teacher-forced reference answers; one step = one answer token), compared between SFT models by "
              "Kendall's tau-b (SE under independence).", "", "| models | Kendall tau |", "|---|---|"]
        L += [f"| {name} | {t:.3f} ± {stats.Z * s:.3f} |" for name, (t, s) in cv["pairs"]]
        L += ["", f"Finding (paper: shards near 1, different priors still positive): {cv['measured']}. "
                  f"Verdict (every pair positive beyond {stats.Z:g} SE, shards above the other prior): "
                  f"**{cv['verdict']}**" + ("; the shards agree less than in the paper (near 1)."
                                            if statistics.mean(cv["shard_taus"] or [1.0]) < 0.9 else "."), ""]
    if ca:
        L += [f"Alignment metric (paper Fig. 2b): the held-out DPO loss of the chosen SFT checkpoint against the base "
              f"(its implicit reward scored on held-out preference pairs of both sets), over every run on the main base: "
              f"{ca['measured']}. Verdict: **{ca['verdict']}**.", ""]
    return L


def _v0_section(res: Dict, c: Optional[Dict], files, rel) -> List[str]:
    L = ["## 4. V(s0) during SFT (paper Sec. 4.5)", "", f"![V(s0)]({rel(files['v0'])})", ""]
    if not c:
        return L
    by: Dict[str, List[Dict]] = {}
    for key, _, s in c["rows"]:
        by.setdefault(key, []).append(s)
    L += ["| run | V(s0) start | V(s0) final | rise | 90% of the rise at step | settled from step |",
          "|---|---|---|---|---|---|"]
    for key, ss in by.items():
        L.append(f"| {key} | {stats.fmt([s['start'] for s in ss], 2)} | {stats.fmt([s['final'] for s in ss], 2)} | "
                 f"{stats.fmt([s['rise'] for s in ss], 2)} | {stats.fmt([s['reached_step'] for s in ss], 0)} | "
                 f"{stats.fmt([s['settled_step'] for s in ss], 0)} |")
    sft_steps, batch = res["sizes"]["sft_steps"], res["sft_batch"]
    L += ["", "V(s0): the trainer's `value_s0` (mean logsumexp at each training row's first answer position, logged "
              f"every {res['sizes']['log_every']} steps); 'settled' = the first step after which its "
              f"{5}-point moving average stays within 10% of the total rise of its final level (mean of the last 10% "
              "of the run); '90% of the rise' = the first step where the moving average has covered 90% of it.", "",
          f"Finding: {c['measured']}. Verdict (in steps, the paper's unit): **{c['verdict']}**. In sequences the "
          f"paper's 150 steps of batch 128 ({150 * 128}) exceed this whole SFT ({sft_steps} steps of batch {batch}, "
          f"{sft_steps * batch}), so the two runs are not comparable that way; 150 steps are {100 * 150 / sft_steps:.0f}% "
          "of this SFT." + _schedule_note(res, by), ""]
    return L


def _schedule_note(res: Dict, by: Dict[str, List[Dict]]) -> str:
    """What the twice-the-budget control says about when V(s0) settles."""
    for key in by:
        if key.endswith(" x2") and key[:-3] in by:
            twice = by[key][0]["settled_step"]
            once = statistics.mean(s["settled_step"] for s in by[key[:-3]])
            n = res["sizes"]["sft_steps"]
            return (f" With twice the budget, rate {key[3:-3]} settles at step {twice} ({100 * twice / (2 * n):.0f}% of "
                    f"its budget) against {once:.0f} ({100 * once / n:.0f}%) with one budget: where V(s0) settles "
                    "follows the learning-rate schedule (cosine decay) more than a fixed number of steps.")
    return ""


def _stability_section(res: Dict, c: Optional[Dict], rel, out_dir: str) -> List[str]:
    stab = res.get("stability")
    if not stab:
        return []
    sp = stab.get("spread_dV") or [float("nan")] * 2
    wi = stab.get("wide_spread_dV") or [float("nan")] * 2
    return ["## 5. Stability: `fk.loss` against the literal KL / JS forms (paper Sec. 5.2)", "",
            f"![stability]({rel(os.path.join(out_dir, 'stability.png'))})", "",
            f"Sequence-level objectives, {stab['steps']} steps, AdamW lr {stab['lr']}, no clipping, fp32; spread "
            f"references: dV in [{sp[0]:.1f}, {sp[1]:.1f}] and [{wi[0]:.1f}, {wi[1]:.1f}]. The v1 study's design "
            "(it does not depend on the regime; v1 ran 300 steps).", "", stability.table(stab), "",
            f"Finding: {c['measured']}. Failures by reference: "
            + ", ".join(f"{ref}: {sum(r['bad_step'] is not None for r in stab['runs'] if r['reference'] == ref)}"
                        for ref in dict.fromkeys(r["reference"] for r in stab["runs"]))
            + " (the paper's blow-up needs dV spread over tens of nats, as unnormalised LLM logits have). "
            f"Verdict: **{c['verdict']}**.", ""]


def _mix_section(res: Dict, c: Optional[Dict]) -> List[str]:
    if not c:
        return []
    return ["## 6. App. D negative control: SFT + lambda * DPO (adaptive lambda), then DPO", "", ARM_HEAD,
            arm_row(res, "mix_dpo", runs_of(res, "mix_dpo")),
            arm_row(res, f"{std_key(res)} (plain SFT)", runs_of(res, std_key(res))), "",
            f"Finding: {c['measured']}. The paper reports the mixture did not help; 'reproduced' needs it to be worse "
            f"beyond the sampling error. Verdict: **{c['verdict']}**.", ""]


def write(res: Dict, out_dir: str, md_path: str) -> Dict[str, Dict]:
    """Figures into ``out_dir`` and the markdown report to ``md_path``; returns the claims."""
    os.makedirs(out_dir, exist_ok=True)
    files = {k: os.path.join(out_dir, f) for k, f in (("lr", "lr_sweep.png"), ("conv", "sft_convergence.png"),
                                                      ("div", "divergences.png"), ("values", "values.png"),
                                                      ("v0", "value_s0.png"))}
    claims = {"lr": claim_lr(res), "mechanism": claim_mechanism(res), "div": claim_div(res), "values": claim_values(res), "align": claim_alignment(res),
              "v0": claim_v0(res), "stability": claim_stability(res.get("stability")), "mix": claim_mix(res)}
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(md_path)))  # noqa: E731
    L = _header(res) + _verdicts(claims)
    if claims["lr"]:
        plot_lr(res, files["lr"])
        plot_convergence(res, files["conv"])
        L += _lr_section(res, claims["lr"], files, rel)
    if any(f"div={d}" in res["arms"] for d in res["divergences"]):
        keys = [(std_key(res), "NLL (tv)")] + [(f"div={d}", d) for d in res["divergences"] if f"div={d}" in res["arms"]]
        plot_div(res, keys, files["div"])
        L += _div_section(res, claims["div"], files, rel)
    if claims["values"] or claims["align"]:
        plot_values(res, claims["values"], claims["align"], files["values"])
        L += _values_section(res, claims["values"], claims["align"], files, rel)
    if claims["v0"]:
        plot_v0(res, files["v0"])
        L += _v0_section(res, claims["v0"], files, rel)
    L += _stability_section(res, claims["stability"], rel, out_dir)
    L += _mix_section(res, claims["mix"])
    with open(md_path, "w") as f:
        f.write("\n".join(L) + "\n")
    return claims
