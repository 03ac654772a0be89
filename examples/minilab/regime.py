"""Mini-lab v2 regime: a base model that knows facts the SFT data never shows.

Data (:func:`write_data`), built on the trainer's synthetic tasks (``fdiv_kernels.train.synthetic``):

* ``pretrain.txt``: problems of the four tasks (``add``, ``reverse``, ``sort``, ``count``) in a
  plain ``add 2+3=5`` format (:func:`plain_text`), held-out ones included (they are the base's knowledge), mixed
  with chat-formatted warm-up conversations on other content (``repeat abc`` -> ``abc``, ...): the
  base learns the skills and facts in plain text and the chat template's structure, but never
  sees a task in the chat template;
* ``sft_train_<k>.jsonl``: chat-formatted demonstrations restricted to the *SFT domain*
  (:func:`in_sft_domain`: sums with a first operand <= 4, strings over ``abcd`` / digits ``0-4``,
  counts over ``ab``), disjoint shards, one per seed: SFT teaches the instruction format on a subset;
* ``pref_train.jsonl``: preference pairs from the whole problem space (the same DPO for every run;
  like UltraFeedback next to UltraChat, broader than the SFT data), held-out prompts excluded;
* ``valid.jsonl``: held-out SFT-domain prompts for early stopping (the held-out SFT loss);
* ``eval_seen.jsonl``: held-out prompts from the SFT domain (never in SFT/DPO data);
* ``eval_unseen.jsonl``: held-out prompts outside it: sums with a first operand >= 5, strings
  with letters ``e-h`` / digits ``5-9``, counts involving ``c``. Their accuracy is knowledge only
  the base can have supplied; losing it is forgetting;
* ``pref_eval.jsonl``: held-out pairs of both kinds (the Sec. 4.5 alignment metric).

Evaluation (:func:`evaluate`): greedy accuracy through the chat template on both held-out sets;
greedy accuracy in the base's own plain format (the knowledge itself, independent of the chat
format); the exact per-token KL(pi || pi_base) over the vocabulary on held-out plain text.
"""

from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Sequence

import torch

from fdiv_kernels.collate import collate
from fdiv_kernels.data import encode_sft, prompt_text
from fdiv_kernels.train.evaluate import greedy_answers
from fdiv_kernels.train.steps import shifted, token_logp
from fdiv_kernels.train.synthetic import (TASKS, make_problem, near_miss, preference_row, sft_row,
                                          solve, write_jsonl)
from fdiv_kernels.train.tokenizer import build_char_tokenizer

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def in_sft_domain(problem: Dict[str, str]) -> bool:
    """Whether a problem lies in the SFT domain (the subset SFT/DPO data are drawn from)."""
    task, arg = problem["prompt"].split(" ", 1)
    if task == "add":
        return int(arg.split("+")[0]) <= 4
    if task == "reverse":
        return set(arg) <= set("abcd")
    if task == "sort":
        return set(arg) <= set("01234")
    if task == "count":
        return "c" not in arg
    raise ValueError(f"unknown task {task!r}")


def draw(n: int, *, seed: int, keep: Callable[[Dict[str, str]], bool] = lambda p: True, exclude=(),
         distinct: bool = False) -> List[Dict[str, str]]:
    """``n`` problems (tasks in round robin) for which ``keep`` holds, none in ``exclude``."""
    rng = random.Random(seed)
    seen, out, tries = set(exclude), [], 0
    while len(out) < n:
        tries += 1
        if tries > 500 * n + 10_000:
            raise ValueError(f"could not draw {n} problems with the given filter")
        p = make_problem(TASKS[len(out) % len(TASKS)], rng)
        if p["prompt"] in seen or not keep(p):
            continue
        if distinct:
            seen.add(p["prompt"])
        out.append(p)
    return out


def format_problem(rng: random.Random) -> Dict[str, str]:
    """A chat-format warm-up problem of none of the four tasks (``repeat``/``first``/``last``/``length``)."""
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 5)))
    kind = rng.choice(("repeat", "first", "last", "length"))
    ans = {"repeat": s, "first": s[0], "last": s[-1], "length": str(len(s))}[kind]
    return {"prompt": f"{kind} {s}", "answer": ans}


def write_data(out_dir: str, *, n_pretrain: int, n_sft: int, n_shards: int, n_pref: int, n_eval: int,
               chat_fraction: float = 0.25, seed: int = 0) -> Dict[str, object]:
    """Write the regime's files to ``out_dir``; returns their paths (``sft_train``: one per shard).

    ``n_eval`` held-out prompts per task and set (seen / unseen), half as many validation prompts.
    (The SFT domain holds only 100 sums: 40 + 20 held out leave 40 for training.)"""
    rng = random.Random(seed + 1)
    seen = draw(n_eval * len(TASKS), seed=seed + 2, keep=in_sft_domain, distinct=True)
    unseen = draw(n_eval * len(TASKS), seed=seed + 3, keep=lambda p: not in_sft_domain(p), distinct=True)
    valid = draw(max(1, n_eval // 2) * len(TASKS), seed=seed + 6, keep=in_sft_domain, distinct=True,
                 exclude={p["prompt"] for p in seen + unseen})
    held = {p["prompt"] for p in seen + unseen + valid}
    pre = draw(n_pretrain, seed=seed + 5)  # held-out problems included at their natural frequency
    p = {k: os.path.join(out_dir, f) for k, f in (
        ("pretrain", "pretrain.txt"), ("dpo_train", "pref_train.jsonl"), ("eval_pref", "pref_eval.jsonl"),
        ("eval_seen", "eval_seen.jsonl"), ("eval_unseen", "eval_unseen.jsonl"), ("valid", "valid.jsonl"))}
    os.makedirs(out_dir, exist_ok=True)
    p["sft_train"] = []
    for k in range(n_shards):
        rows = draw(n_sft, seed=seed + 100 + k, keep=in_sft_domain, exclude=held)
        p["sft_train"].append(os.path.join(out_dir, f"sft_train_{k}.jsonl"))
        write_jsonl(p["sft_train"][-1], (sft_row(r) for r in rows))
    pref = draw(n_pref, seed=seed + 4, exclude=held)
    write_jsonl(p["dpo_train"], (preference_row(r, near_miss(r, rng)) for r in pref))
    mixed = [x for pair in zip(seen, unseen) for x in pair]
    write_jsonl(p["eval_pref"], (preference_row(r, near_miss(r, rng)) for r in mixed))
    write_jsonl(p["eval_seen"], (sft_row(r) for r in seen))
    write_jsonl(p["eval_unseen"], (sft_row(r) for r in unseen))
    write_jsonl(p["valid"], (sft_row(r) for r in valid))
    tok = build_char_tokenizer()
    with open(p["pretrain"], "w", encoding="utf-8") as f:
        for r in pre:
            if rng.random() < chat_fraction:
                f.write(tok.apply_chat_template(sft_row(format_problem(rng))["messages"], tokenize=False) + "\n")
            f.write(plain_text(r))
    return p


def plain_prompt(question: str) -> str:
    """The base's own format: ``add 2+3=`` on a line of its own. Its token geometry matches the chat
    template's (one separator token before the answer, one after), so the format is a thin wrapper."""
    return f"\n{question}="


def plain_text(problem: Dict[str, str]) -> str:
    return f"{problem['prompt']}={problem['answer']}\n"


def _grade(questions: Sequence[str], outputs: Sequence[str], *, plain: bool) -> Dict[str, float]:
    per: Dict[str, List[bool]] = {}
    for q, o in zip(questions, outputs):
        if plain:
            o = o.split("\n", 1)[0]
        per.setdefault(q.split(" ", 1)[0], []).append(o.strip() == solve(q))
    res = {t: sum(v) / len(v) for t, v in sorted(per.items())}
    res["all"] = sum(sum(v) for v in per.values()) / max(1, sum(len(v) for v in per.values()))
    return res


@torch.no_grad()
def token_kl(model, base, tok, texts: Sequence[str], *, batch_size: int = 128) -> float:
    """Mean over the positions of ``texts`` of the exact KL(pi(.|s) || pi_base(.|s)) in nats."""
    tot, n = 0.0, 0
    for s in range(0, len(texts), batch_size):
        enc = tok(list(texts[s: s + batch_size]), add_special_tokens=False, return_tensors="pt", padding=True)
        lp = torch.log_softmax(model(**enc).logits.float(), -1)
        lb = torch.log_softmax(base(**enc).logits.float(), -1)
        kl = (lp.exp() * (lp - lb)).sum(-1)
        m = enc["attention_mask"].bool()
        tot += float(kl[m].sum())
        n += int(m.sum())
    return tot / max(n, 1)


def evaluate(model, tok, sets: Dict[str, Sequence[dict]], *, base=None, plain: bool = True, max_new_tokens: int = 8,
             batch_size: int = 200) -> Dict[str, Dict]:
    """Per held-out set: chat (and with ``plain``, plain-format) greedy accuracy per task and ``all``;
    with ``base``, ``kl_base``: the exact per-token KL(pi || base) on the set's plain text."""
    dev = torch.device("cpu")
    out: Dict[str, Dict] = {}
    model.eval()
    for name, rows in sets.items():
        qs = [r["messages"][0]["content"] for r in rows]
        chat = greedy_answers(model, tok, [prompt_text(tok, r["messages"]) for r in rows],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, device=dev)
        out[name] = {"chat": _grade(qs, chat, plain=False)}
        if plain:
            outs = greedy_answers(model, tok, [plain_prompt(q) for q in qs], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, device=dev)
            out[name]["plain"] = _grade(qs, outs, plain=True)
        if base is not None:
            out[name]["kl_base"] = token_kl(model, base, tok, [plain_prompt(q) + solve(q) + "\n" for q in qs])
    return out


def chat_batches(tok, rows: Sequence[dict], *, max_length: int = 48, batch_size: int = 64) -> List[dict]:
    """Templated, prompt-masked batches of ``rows`` (the trainer's encoding)."""
    enc = encode_sft(tok, rows, max_length=max_length)
    return [collate(enc[s: s + batch_size], pad_id=tok.pad_token_id) for s in range(0, len(enc), batch_size)]


@torch.no_grad()
def answer_stats(model, batches: Sequence[dict]) -> Dict[str, object]:
    """Teacher-forced on the reference answers: ``nll`` (mean per supervised token) and ``values``,
    the state values V(s) = logsumexp of the logits at every answer position (the paper's Sec. 4.4
    values at step boundaries; one step = one answer token here)."""
    model.eval()
    tot, n, values = 0.0, 0, []
    for b in batches:
        st = token_logp(model, b, backend="torch")
        m = shifted(b) != -100
        tot += float(-(st.logp * m).sum())
        n += int(m.sum())
        values += st.lse[m].tolist()
    return {"nll": tot / max(n, 1), "values": values}
