"""Evaluation: greedy-generation task accuracy, and the implicit-reward alignment metric.

* :func:`greedy_answers` / :func:`task_accuracy`: batched greedy decoding (left-padded prompts,
  ``model.generate``) of held-out prompts, graded by the synthetic checker.
* the paper's Sec. 4.5 alignment metric is :class:`fdiv_kernels.analysis.alignment.AlignmentEval`
  (the DPO loss and accuracy of the current model against a reference on held-out pairs).
* :func:`mean_logratio`: mean per-token ``logp - ref_logp`` on held-out answers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from ..hf import unwrap
from ..collate import IGNORE_INDEX
from ..data import prompt_text
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


def mean_logratio(model, ref_model, batches: Sequence[dict], *, backend: str = "auto") -> Optional[float]:
    """Mean per-token ``logp - ref_logp`` on supervised tokens of ``batches`` (KL estimate on data)."""
    from .steps import reference_token_logp, shifted

    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            lp = reference_token_logp(model, b, backend=backend)
            rp = reference_token_logp(ref_model, b, backend=backend)
            mask = shifted(b) != IGNORE_INDEX
            tot += float(((lp - rp) * mask).sum())
            n += int(mask.sum())
    return tot / n if n else None


__all__ = ["greedy_answers", "mean_logratio", "task_accuracy"]
