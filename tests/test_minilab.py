"""Mini-lab: a smoke run of the driver (every section of the report written) and checks of the
regime's data split and of the statistics behind the verdicts against independent references."""

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "minilab"))

import regime  # noqa: E402
import stats  # noqa: E402

SECTIONS = ("## Verdicts", "## 1. SFT learning rate", "## 2. Divergences", "## 3. Logits as values",
            "## 4. V(s0)", "## 5. Stability", "## 6. App. D")
FIGURES = ("lr_sweep.png", "sft_convergence.png", "divergences.png", "values.png", "value_s0.png", "stability.png")


def test_minilab_smoke(tmp_path):
    out, md, runs = tmp_path / "fig", tmp_path / "results.md", tmp_path / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "minilab", "run.py"), "--smoke", "--seeds", "0",
           "--jobs", "2", "--no-progress", "--out", str(out), "--results", str(md), "--runs", str(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = md.read_text()
    for section in SECTIONS:
        assert section in text, section
    for claim in ("Sec. 4.2", "Sec. 4.3", "Sec. 4.4", "Sec. 4.5", "Sec. 5.2"):
        assert f"| {claim} |" in text, claim
    assert "| lr=0.003 (standard) |" in text and "| pearson |" in text and "kl: naive exp(-r-1)" in text
    for png in FIGURES:
        assert os.path.getsize(out / png) > 5000, png
    r = json.loads((out / "results.json").read_text())
    arm = next(iter(r["arms"]["lr=0.003"].values()))
    assert arm["sft_best_step"] in arm["curves"]["eval_step"] and arm["sft_best_step"] > 0
    kept = sorted(p.name for p in (runs / "lr=0.003-s0" / "sft").iterdir() if p.name.startswith("checkpoint-"))
    assert kept == [f"checkpoint-{arm['sft_best_step']}"]  # the DPO start; the other checkpoints are dropped
    # the report is a pure function of results.json (what --reuse-results does)
    import report

    report.write(r, str(tmp_path / "fig2"), str(tmp_path / "results2.md"))
    assert (tmp_path / "results2.md").read_text() == text.replace("](fig/", "](fig2/")


def test_regime_split(tmp_path):
    p = regime.write_data(str(tmp_path), n_pretrain=400, n_sft=80, n_shards=2, n_pref=60, n_eval=5)

    def prompts(path):
        with open(path) as f:
            return [json.loads(line)["prompt"] for line in f]

    seen, unseen, valid = prompts(p["eval_seen"]), prompts(p["eval_unseen"]), prompts(p["valid"])
    assert len(seen) == len(unseen) == 20 and len(valid) == 8
    assert len(set(seen + unseen + valid)) == 48  # distinct and disjoint
    held = set(seen + unseen + valid)
    for shard in p["sft_train"]:
        rows = prompts(shard)
        assert not held & set(rows)
        assert all(regime.in_sft_domain({"prompt": q}) for q in rows)
    assert all(regime.in_sft_domain({"prompt": q}) for q in seen + valid)
    assert not any(regime.in_sft_domain({"prompt": q}) for q in unseen)
    pref = prompts(p["dpo_train"])
    assert not held & set(pref) and not all(regime.in_sft_domain({"prompt": q}) for q in pref)
    text = open(p["pretrain"]).read()
    assert "<|assistant|>" in text and "sort " in text and "<|user|>sort" not in text  # tasks never in chat form


def test_plain_format_matches_chat_geometry():
    """After the opening (plain: newline; chat: <s><|user|>) the layouts agree token for token:
    the question, one separator, the answer, one terminator."""
    from fdiv_kernels.train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    q, a = "sort 591", "159"
    plain = tok(regime.plain_prompt(q) + a + "\n", add_special_tokens=False)["input_ids"]
    chat = tok(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       tokenize=False), add_special_tokens=False)["input_ids"]
    body_plain, body_chat = plain[1:], chat[2:]
    n = len(q)
    assert len(body_plain) == len(body_chat) == n + len(a) + 2
    assert body_plain[:n] == body_chat[:n] and body_plain[n + 1: n + 1 + len(a)] == body_chat[n + 1: n + 1 + len(a)]


def test_token_kl_matches_categorical_kl():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv_kernels.train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    a, b = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    texts = ["\nadd 2+3=5\n", "\nreverse abc=cba\n"]
    got = regime.token_kl(a, b, tok, texts)
    ref, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            pa = torch.distributions.Categorical(logits=a(ids).logits[0].double())
            pb = torch.distributions.Categorical(logits=b(ids).logits[0].double())
            kl = torch.distributions.kl_divergence(pa, pb)
            ref += float(kl.sum())
            n += kl.numel()
    assert got == pytest.approx(ref / n, rel=1e-4)
    assert regime.token_kl(a, a, tok, texts) == pytest.approx(0.0, abs=1e-6)


def _tau_brute(x, y):
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        conc += sx * sy > 0
        disc += sx * sy < 0
        tx += sx != 0
        ty += sy != 0
    return (conc - disc) / math.sqrt(tx * ty)


def test_kendall_tau_b_with_ties():
    rng = random.Random(0)
    x = [rng.randint(0, 5) for _ in range(40)]
    y = [v + rng.randint(-2, 2) for v in x]
    tau, se = stats.kendall_tau(x, y)
    assert tau == pytest.approx(_tau_brute(x, y), abs=1e-12)
    assert se == pytest.approx(math.sqrt(2 * (2 * 40 + 5) / (9 * 40 * 39)))
    assert stats.kendall_tau(x, x)[0] == pytest.approx(1.0)


def test_spearman_is_pearson_of_average_ranks():
    x = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    y = [1.0, 3.0, 2.0, 4.0, 6.0, 5.0]
    avg_rank = {3.0: 3, 1.0: 0, 2.0: 1.5, 5.0: 5, 4.0: 4}  # by hand (0-based, ties averaged)
    rx = torch.tensor([avg_rank[v] for v in x], dtype=torch.float64)
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    ref = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert stats.spearman(x, y)[0] == pytest.approx(ref, abs=1e-12)


def test_slope_matches_least_squares():
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    ys = [1.0, 2.9, 5.2, 7.1, 8.8]
    a = torch.tensor([[1.0, x] for x in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution
    resid = torch.tensor(ys, dtype=torch.float64) - (a @ coef).squeeze(1)
    cov = float((resid @ resid) / 3) * torch.linalg.inv(a.T @ a)
    b, se = stats.slope(xs, ys)
    assert b == pytest.approx(float(coef[1]), abs=1e-12) and se == pytest.approx(math.sqrt(float(cov[1, 1])))


def test_verdict_and_settling():
    assert stats.verdict(0.1, 0.02) == "reproduced"
    assert stats.verdict(-0.1, 0.02) == "not reproduced"
    assert stats.verdict(0.03, 0.02) == "inconclusive"
    assert stats.verdict(-0.1, 0.02, expected_sign=-1) == "reproduced"
    assert stats.verdict(0.1, 0.0, floor=0.1) == "inconclusive"
    steps = list(range(0, 500, 5))
    curve = [10 - 5 * math.exp(-s / 30) for s in steps]  # within 10% of the 5-nat rise after ~70 steps
    s = stats.first_settled(steps, curve)
    assert 60 <= s["settled_step"] <= 120 and 3 < s["rise"] < 5  # start = mean of the first 5 points


def _fake_run(seed, dpo, sft=0.5, nll=0.3, kl=0.1, plain=0.9):
    def phase(a):
        split = {"chat": {"all": a}, "plain": {"all": plain}, "kl_base": kl}
        return {"seen": split, "unseen": split}
    return {"seed": seed, "shard": seed, "dpo": phase(dpo), "sft": phase(sft), "sft_heldout_nll": nll,
            "curves": {"step": [], "value_s0": []}}


def _fake_results(dpo_by_lr):
    arms = {f"lr={lr:g}": {str(s): _fake_run(s, a + 0.01 * s) for s in range(3)} for lr, a in dpo_by_lr.items()}
    return {"arms": arms, "sizes": {"n_eval": 40}, "sft_lrs": sorted(dpo_by_lr), "standard_lr": 3e-3,
            "base": {"eval": {"unseen": {"plain": {"all": 1.0}}}}}


@pytest.mark.parametrize("dpo, expected", [
    ({3e-4: 0.90, 1e-3: 0.88, 3e-3: 0.70, 1e-2: 0.50}, "reproduced"),
    ({3e-4: 0.50, 1e-3: 0.60, 3e-3: 0.80, 1e-2: 0.50}, "not reproduced"),
    ({3e-4: 0.60, 1e-3: 0.90, 3e-3: 0.75, 1e-2: 0.50}, "inconclusive"),   # one better, one worse
    ({3e-4: 0.76, 1e-3: 0.74, 3e-3: 0.75, 1e-2: 0.50}, "inconclusive"),   # within the sampling error
])
def test_lr_claim_rule(dpo, expected):
    import report

    c = report.claim_lr(_fake_results(dpo))
    assert c["verdict"] == expected
    # 320 prompts: the binomial part alone is ~0.03 per difference, so 0.02 can never decide
    d, se = c["comps"]["lr=0.001"]
    assert d == pytest.approx(dpo[1e-3] - dpo[3e-3]) and se > 0.025


def test_rerunning_the_lab_replaces_its_own_runs(tmp_path):
    """make minilab twice: the lab's run directories (its own outputs) are redone, not refused (the
    trainer refuses to clear a finished run unless told to overwrite)."""
    import lab

    data = regime.write_data(str(tmp_path / "data"), n_pretrain=60, n_sft=20, n_shards=1, n_pref=10, n_eval=2)
    runs = str(tmp_path / "runs")
    first = lab.pretrain_base(data, runs, "base", steps=2, seed=0)
    again = lab.pretrain_base(data, runs, "base", steps=2, seed=0)
    assert first["dir"] == again["dir"] and os.path.exists(os.path.join(again["dir"], "model.safetensors"))
