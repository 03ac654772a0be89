"""Mini-lab, stability: KL-SFT and JS-SFT with ``fk.loss`` against the literal forms, same seeds.

Reproduces the paper's Sec. 5.2 failure on the trainer's synthetic tasks and tiny Llama, after
``../shared/docs/stability-findings.md``: sequence-level objectives with the implicit reward
``r = beta * log(pi/pi_ref) + V(s0) - V(s_T)`` (V = lse of the policy's logits, with gradient),
AdamW lr 1e-3, no gradient clipping, fp32, three reference models (random init; "warm" after
NLL steps; warm with a state-dependent constant added to its logits, which leaves the policy
unchanged but spreads dV the way real LLM logits do). The policy starts from its reference.

"Bad" = the first step with a NaN/Inf loss or gradient, or |loss| > 1e6; a run stops there.

Run alone: ``python examples/minilab/stability.py --out docs/minilab`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from typing import Dict, List, Optional

import torch

import fdiv_kernels as fk
from fdiv_kernels.reference import paper_forms
from fdiv_kernels.collate import collate
from fdiv_kernels.data import encode_sft
from fdiv_kernels.train.synthetic import problems, sft_row
from fdiv_kernels.train.tokenizer import build_char_tokenizer

TASKS = ("reverse", "sort", "add")
BAD_LOSS = 1e6

# method -> (divergence for fk.loss, literal form or None)
METHODS = {
    "nll": ("sft", None),
    "kl: fk.loss": ("kl", None),
    "kl: naive exp(-r-1)": (None, ("kl", True)),
    "js: fk.loss": ("js", None),
    "js: naive log(2-exp(-r)), clipped": (None, ("js", True)),
    "js: Table 4 literal": (None, ("js", False)),
}


def tiny_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def batches(tok, probs, batch: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    rows = [sft_row(p) for p in probs]
    enc = encode_sft(tok, rows, max_length=96)
    rng = random.Random(seed)
    rng.shuffle(enc)
    return [collate(enc[i:i + batch], pad_id=tok.pad_token_id) for i in range(0, len(enc) - batch + 1, batch)]


def head_stats(model, b):
    """Per-token (logp, lse) of the shifted labels through the fused primitive, plus its inputs."""
    h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
    labels = b["labels"][:, 1:]
    return h, model.lm_head.weight, labels


def literal_objective(form, naive, model, ref_tok, b):
    h, w, labels = head_stats(model, b)
    st = fk.token_stats(h, w, labels, backend="torch")
    mask = labels != -100
    logp = (st.logp * mask).sum(-1)
    ref = (ref_tok * mask).sum(-1)
    pos = torch.arange(mask.shape[1]).expand_as(mask)
    first = torch.where(mask, pos, mask.shape[1]).min(-1).values
    last = torch.where(mask, pos, -1).max(-1).values
    v0 = st.lse.gather(1, first[:, None]).squeeze(1)
    vt = st.lse.gather(1, last[:, None]).squeeze(1)
    return paper_forms.literal_loss(form, logp, ref, v0, vt, beta=1.0, naive=naive)


def warm_up(model, data, steps: int, lr: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for i in range(steps):
        b = data[i % len(data)]
        h, w, labels = head_stats(model, b)
        loss = fk.loss(h, w, labels, divergence="sft", backend="torch").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def spread_values(model, data, lo: float = -8.0, hi: float = 22.0):
    """Add a state-dependent constant c(s) = h(s).a to every logit (rank-1 change of the head):
    the policy is unchanged, V(s) moves by c(s), scaled so dV = V(s0) - V(s_T) spans about [lo, hi]."""
    b = data[0]
    with torch.no_grad():
        h, _, labels = head_stats(model, b)
        a = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(7))
        mask = labels != -100
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        first = torch.where(mask, pos, mask.shape[1]).min(-1).values
        last = torch.where(mask, pos, -1).max(-1).values

        def dv_of(vec):
            c = h @ vec
            return (c.gather(1, first[:, None]) - c.gather(1, last[:, None])).squeeze(1)

        a = a * (hi - lo) / max(float(dv_of(a).max() - dv_of(a).min()), 1e-6)   # spread
        hs0 = h[torch.arange(h.shape[0]), first]
        hst = h[torch.arange(h.shape[0]), last]
        d = (hs0 - hst).mean(0)
        d = d / float(d @ d)                      # dv_of(d) is 1 on average
        mid = 0.5 * (lo + hi) - float(dv_of(a).mean())
        a = a + mid * d                          # centre
        model.lm_head.weight.add_(a[None, :].expand_as(model.lm_head.weight))
        dv = dv_of(a)
    return float(dv.min()), float(dv.max())


def heldout_nll(model, data) -> float:
    with torch.no_grad():
        tot, n = 0.0, 0
        for b in data:
            h, w, labels = head_stats(model, b)
            st = fk.token_stats(h, w, labels, backend="torch")
            m = labels != -100
            tot += float(-(st.logp * m).sum())
            n += int(m.sum())
    return tot / max(n, 1)


def run_one(ref_model, method: str, data, evald, *, steps: int, lr: float, seed: int) -> Dict:
    div, literal = METHODS[method]
    torch.manual_seed(seed)
    policy = copy.deepcopy(ref_model)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    losses, bad_step, bad_why = [], None, None
    for step in range(steps):
        b = data[(step + seed * 17) % len(data)]
        with torch.no_grad():
            rh, rw, labels = head_stats(ref_model, b)
            ref_tok = fk.token_stats(rh, rw, labels, backend="torch").logp
        if literal is None:
            h, w, labels = head_stats(policy, b)
            kw = {} if div == "sft" else dict(ref_logp=ref_tok, beta=1.0, level="sequence", values="free", z_loss=1e-3)
            loss = fk.loss(h, w, labels, divergence=div, backend="torch", **kw).loss
        else:
            loss = literal_objective(literal[0], literal[1], policy, ref_tok, b)
        opt.zero_grad()
        loss.backward()
        val = float(loss.detach())
        grads_ok = all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
        losses.append(val if math.isfinite(val) else None)
        if not math.isfinite(val) or abs(val) > BAD_LOSS or not grads_ok:
            bad_step = step
            bad_why = "NaN/Inf loss" if not math.isfinite(val) else ("NaN/Inf gradient" if not grads_ok else f"|loss| {val:.3g}")
            break
        opt.step()
    return {"method": method, "seed": seed, "losses": losses, "bad_step": bad_step, "bad_why": bad_why,
            "heldout_nll": None if bad_step is not None else heldout_nll(policy, evald)}


REFERENCES = ("random", "warm", "warm, spread dV", "warm, wide spread dV")


def _setup(quick: bool):
    tok = build_char_tokenizer()
    held = problems(96 if not quick else 32, seed=12, tasks=TASKS)  # distinct held-out prompts
    train = problems(2400 if not quick else 160, seed=11, tasks=TASKS, distinct=False,
                     exclude={p["prompt"] for p in held})
    return tok, batches(tok, train, 16, seed=11), batches(tok, held, 16, seed=12)


def build_reference(name: str, data, *, warm_steps: int, lr: float):
    """The reference model ``name`` (one of :data:`REFERENCES`) and its dV spread (or None)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown stability reference {name!r}; known: {', '.join(REFERENCES)}")
    model = tiny_model(len(build_char_tokenizer()), 0)
    if name == "random":
        return model, None
    model = warm_up(model, data, warm_steps, lr)
    if name == "warm":
        return model, None
    lo, hi = (-8.0, 22.0) if name == "warm, spread dV" else (-40.0, 80.0)
    return model, spread_values(model, data, lo=lo, hi=hi)


def run_reference(name: str, *, steps: int = 300, seeds=(0, 1), warm_steps: int = 150, lr: float = 1e-3,
                  quick: bool = False) -> Dict:
    """Every method against one reference model, each seed: ``{"reference", "runs", "dV", ...}``.
    Independent of the other references, so a process pool can run the four side by side."""
    t0 = time.time()
    tok, data, evald = _setup(quick)
    ref, dv = build_reference(name, data, warm_steps=warm_steps, lr=lr)
    ref.eval()
    runs = []
    for seed in seeds:
        for method in METHODS:
            r = run_one(ref, method, data, evald, steps=steps, lr=lr, seed=seed)
            r["reference"] = name
            runs.append(r)
    return {"reference": name, "runs": runs, "dV": dv, "heldout_nll": heldout_nll(ref, evald),
            "seconds": time.time() - t0}


def combine(parts: List[Dict], out_dir: str, *, steps: int, seeds, warm_steps: int, lr: float = 1e-3) -> Dict:
    """The study's report (``stability.json``, ``stability.png``) from :func:`run_reference` results."""
    by = {p["reference"]: p for p in parts}
    order = [r for r in REFERENCES if r in by]
    report = {"steps": steps, "seeds": list(seeds), "lr": lr, "warm_steps": warm_steps,
              "spread_dV": by.get("warm, spread dV", {}).get("dV"),
              "wide_spread_dV": by.get("warm, wide spread dV", {}).get("dV"),
              "warm_heldout_nll": by.get("warm", {}).get("heldout_nll"),
              "seconds": sum(p["seconds"] for p in parts), "runs": [r for name in order for r in by[name]["runs"]]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stability.json"), "w") as f:
        json.dump(report, f)
    plot(report, os.path.join(out_dir, "stability.png"))
    return report


def run(out_dir: str, *, steps: int = 300, seeds=(0, 1), warm_steps: int = 150, lr: float = 1e-3,
        quick: bool = False, threads: Optional[int] = None) -> Dict:
    """The whole study in this process (``threads``: torch intra-op threads, default up to 2)."""
    torch.set_num_threads(threads or max(1, min(2, os.cpu_count() or 1)))
    parts = [run_reference(name, steps=steps, seeds=seeds, warm_steps=warm_steps, lr=lr, quick=quick)
             for name in REFERENCES]
    return combine(parts, out_dir, steps=steps, seeds=seeds, warm_steps=warm_steps, lr=lr)


def plot(report: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = list(dict.fromkeys(r["reference"] for r in report["runs"]))
    fig, axes = plt.subplots(1, len(refs), figsize=(5 * len(refs), 3.6), squeeze=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, ref in zip(axes[0], refs):
        for r in report["runs"]:
            if r["reference"] != ref:
                continue
            ys = [abs(v) if v is not None else float("nan") for v in r["losses"]]
            label = r["method"] if r["seed"] == report["seeds"][0] else None
            ax.plot(range(len(ys)), ys, color=colors[r["method"]], alpha=0.8, lw=1, label=label)
            if r["bad_step"] is not None:
                ax.plot([r["bad_step"]], [ys[-2] if len(ys) > 1 and ys[-2] == ys[-2] else 1.0], "x",
                        color=colors[r["method"]], ms=8)
        ax.set_yscale("log")
        ax.set_title(f"reference: {ref}")
        ax.set_xlabel("step")
        ax.set_ylabel("|loss| (x = first bad step)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: Dict) -> str:
    """Markdown: per reference and method, bad steps over seeds and held-out NLL (mean +- spread)."""
    lines = ["| reference | method | first bad step per seed | max abs(loss) | held-out NLL (finished runs) |",
             "|---|---|---|---|---|"]
    refs = list(dict.fromkeys(r["reference"] for r in report["runs"]))
    for ref in refs:
        for m in METHODS:
            rs = [r for r in report["runs"] if r["reference"] == ref and r["method"] == m]
            bad = ", ".join("stable" if r["bad_step"] is None else f"{r['bad_step']} ({r['bad_why']})" for r in rs)
            nll = [r["heldout_nll"] for r in rs if r["heldout_nll"] is not None]
            nll_s = f"{sum(nll) / len(nll):.3f} (range {min(nll):.3f}-{max(nll):.3f})" if nll else "-"
            peak = max((abs(v) for r in rs for v in r["losses"] if v is not None), default=float("nan"))
            lines.append(f"| {ref} | {m} | {bad} | {peak:.3g} | {nll_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/minilab")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rep = run(a.out, steps=20 if a.quick else a.steps, seeds=a.seeds[:1] if a.quick else a.seeds,
              warm_steps=10 if a.quick else 150, quick=a.quick)
    print(table(rep))
    print(f"spread of dV: {rep['spread_dV']}, {rep['seconds']:.0f} s")
