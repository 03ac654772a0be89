"""Evaluation: greedy-generation task accuracy, and the implicit-reward alignment metric.

* :func:`greedy_answers` / :func:`task_accuracy`: batched greedy decoding (left-padded prompts,
  ``model.generate``) of held-out prompts, graded by the synthetic checker.
* :func:`alignment`: the paper's Sec. 4.5 metric: the DPO loss and accuracy (sigmoid, ``beta``)
  of the current model against a reference (the start model) on held-out preference pairs,
  with the reference log-probs computed once and cached.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch


from .data import collate_pairs, prompt_text
from .modeling import unwrap
from .steps import dpo_from_logps, pair_logps, reference_pair_logps
from .synthetic import check_answer


@torch.no_grad()
def greedy_answers(model, tok, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                   device: torch.device) -> List[str]:
    """Greedy completions of templated ``prompts`` (strings from :func:`~.data.prompt_text`)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    side = tok.padding_side
    tok.padding_side = "left"
    outs: List[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = list(prompts[s: s + batch_size])
            enc = tok(chunk, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            gen = m.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = side
        m.train(was_training)
    return outs


def task_accuracy(model, tok, rows: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                  device: torch.device, num_samples: int = 3) -> Dict[str, object]:
    """Fraction of held-out UltraChat-schema ``rows`` (synthetic prompts) answered exactly right.

    Returns ``{"accuracy", "per_task": {task: acc}, "n", "samples": [{prompt, output, ok}]}``.
    """
    prompts = [prompt_text(tok, r["messages"]) for r in rows]
    questions = [r["messages"][-2]["content"] if r["messages"][-1]["role"] == "assistant" else r["messages"][-1]["content"]
                 for r in rows]
    answers = greedy_answers(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    per = defaultdict(list)
    samples = []
    for q, a in zip(questions, answers):
        ok = check_answer(q, a)
        per[q.split(" ", 1)[0]].append(ok)
        if len(samples) < num_samples:
            samples.append({"prompt": q, "output": a, "ok": ok})
    n = len(answers)
    total = sum(sum(v) for v in per.values())
    return {"accuracy": total / max(n, 1), "n": n,
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())}, "samples": samples}


class AlignmentEval:
    """DPO loss / accuracy / margin of a model vs. a fixed reference on held-out pairs.

    The reference's sequence log-probs are computed once at construction (no_grad, fused).
    """

    def __init__(self, ref_model, pairs: Sequence[dict], *, pad_id: int, beta: float, batch_size: int,
                 device: torch.device, backend: str = "auto"):
        self.batches = [collate_pairs(pairs[s: s + batch_size], pad_id=pad_id)
                        for s in range(0, len(pairs), batch_size)]
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        self.beta, self.backend = beta, backend
        self.refs = [reference_pair_logps(ref_model, b, backend=backend) for b in self.batches]

    @torch.no_grad()
    def __call__(self, model) -> Dict[str, float]:
        m = unwrap(model)  # train/eval mode; the forward runs through ``model`` (an FSDP2 root needs it)
        was = m.training
        m.eval()
        losses, accs, margins = [], [], []
        for b, r in zip(self.batches, self.refs):
            out = dpo_from_logps(pair_logps(model, b, backend=self.backend), r, kind="sigmoid", beta=self.beta)
            losses.append(out.losses)
            accs.append((out.chosen_rewards > out.rejected_rewards).float())
            margins.append(out.chosen_rewards - out.rejected_rewards)
        m.train(was)
        cat = torch.cat
        return {"align_dpo_loss": float(cat(losses).mean()), "align_accuracy": float(cat(accs).mean()),
                "align_margin": float(cat(margins).mean())}


def mean_logratio(model, ref_model, batches: Sequence[dict], *, backend: str = "auto") -> Optional[float]:
    """Mean per-token ``logp - ref_logp`` on supervised tokens of ``batches`` (KL estimate on data)."""
    from .steps import reference_token_logp, shifted

    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            lp = reference_token_logp(model, b, backend=backend)
            rp = reference_token_logp(ref_model, b, backend=backend)
            mask = shifted(b) != -100
            tot += float(((lp - rp) * mask).sum())
            n += int(mask.sum())
    return tot / n if n else None


__all__ = ["AlignmentEval", "greedy_answers", "mean_logratio", "task_accuracy"]
