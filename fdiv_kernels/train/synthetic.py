"""Synthetic tasks with automatically checkable answers, in the UltraChat / UltraFeedback schemas.

Four tasks, each a short prompt with exactly one right answer (character-level friendly):

| task    | prompt            | answer  |
|---------|-------------------|---------|
| add     | ``add 7+15``      | ``22``  |
| reverse | ``reverse hbd``   | ``dbh`` |
| sort    | ``sort 591``      | ``159`` |
| count   | ``count a in abaa`` | ``3`` |

Rows produced here:

* SFT (UltraChat-200K schema): ``{"prompt", "prompt_id", "messages": [{"role": "user", ...},
  {"role": "assistant", ...}]}``;
* preferences (UltraFeedback-binarized schema): ``{"prompt", "prompt_id", "chosen": [...],
  "rejected": [...], "score_chosen", "score_rejected"}`` where ``chosen`` ends with the right
  answer and ``rejected`` with a plausible mistake (:func:`near_miss`, or a model's own wrong
  output, see :func:`preference_row`);
* pretraining text (:func:`pretrain_text`): the same problems in a plain ``Q: ... A: ...`` format
  (no chat template), some answers deliberately wrong, so a briefly pretrained base model knows
  the tasks imperfectly and does not know the chat format.

:func:`check_answer` grades a model's completion against the prompt (exact match after strip).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Dict, Iterable, List, Sequence

TASKS = ("add", "reverse", "sort", "count")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_problem(task: str, rng: random.Random) -> Dict[str, str]:
    """One problem ``{"task", "prompt", "answer"}`` of the given task."""
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 19)
        return {"task": task, "prompt": f"add {a}+{b}", "answer": str(a + b)}
    if task == "reverse":
        s = "".join(rng.choice(_LETTERS[:8]) for _ in range(rng.randint(2, 4)))
        return {"task": task, "prompt": f"reverse {s}", "answer": s[::-1]}
    if task == "sort":
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4)))
        return {"task": task, "prompt": f"sort {s}", "answer": "".join(sorted(s))}
    if task == "count":
        alphabet = _LETTERS[: rng.randint(2, 3)]
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5)))
        c = rng.choice(alphabet)
        return {"task": task, "prompt": f"count {c} in {s}", "answer": str(s.count(c))}
    raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")


def solve(prompt: str) -> str:
    """The right answer to a synthetic prompt (raises ValueError for anything else)."""
    p = prompt.strip()
    try:
        if p.startswith("add "):
            a, b = p[4:].split("+")
            return str(int(a) + int(b))
        if p.startswith("reverse "):
            return p[8:][::-1]
        if p.startswith("sort "):
            return "".join(sorted(p[5:]))
        if p.startswith("count "):
            c, s = p[6:].split(" in ")
            return str(s.count(c))
    except ValueError:
        pass
    raise ValueError(f"not a synthetic task prompt: {prompt!r}")


def check_answer(prompt: str, completion: str) -> bool:
    """True when ``completion`` (stripped) is the right answer to ``prompt``."""
    return completion.strip() == solve(prompt)


def near_miss(problem: Dict[str, str], rng: random.Random) -> str:
    """A plausible wrong answer: off-by-one/ten sums and counts, one swapped pair of characters,
    an unreversed or unsorted string, a dropped character."""
    ans, task = problem["answer"], problem["task"]
    for _ in range(20):
        if task in ("add", "count"):
            cand = str(max(0, int(ans) + rng.choice((-10, -2, -1, 1, 2, 10) if task == "add" else (-1, 1, 2))))
        else:
            kind = rng.randrange(3)
            src = problem["prompt"].split(" ", 1)[1]
            if kind == 0 and len(ans) > 1:
                i = rng.randrange(len(ans) - 1)
                cand = ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:]
            elif kind == 1:
                cand = src
            else:
                i = rng.randrange(len(ans))
                cand = ans[:i] + ans[i + 1:]
        if cand != ans:
            return cand
    return ans + ans[-1]


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def sft_row(problem: Dict[str, str]) -> dict:
    """UltraChat-200K-schema row for a problem."""
    p = problem["prompt"]
    return {"prompt": p, "prompt_id": _prompt_id(p),
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": problem["answer"]}]}


def preference_row(problem: Dict[str, str], rejected: str) -> dict:
    """UltraFeedback-binarized-schema row: chosen = right answer, rejected = ``rejected``."""
    p = problem["prompt"]
    user = {"role": "user", "content": p}
    return {"prompt": p, "prompt_id": _prompt_id(p),
            "chosen": [user, {"role": "assistant", "content": problem["answer"]}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
            "score_chosen": 10.0, "score_rejected": 1.0}


def problems(n: int, *, seed: int, tasks: Sequence[str] = TASKS, exclude: Iterable[str] = (),
             distinct: bool = True) -> List[Dict[str, str]]:
    """``n`` problems, tasks in round robin, none whose prompt is in ``exclude``; pairwise
    distinct prompts when ``distinct`` (held-out sets), repeats allowed otherwise (training sets)."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown synthetic task {t!r}; known: {', '.join(TASKS)}")
    rng = random.Random(seed)
    seen = set(exclude)
    out: List[Dict[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems from tasks {list(tasks)}")
        pr = make_problem(tasks[len(out) % len(tasks)], rng)
        if pr["prompt"] in seen:
            continue
        if distinct:
            seen.add(pr["prompt"])
        out.append(pr)
    return out


def pretrain_text(problem: Dict[str, str], rng: random.Random, *, noise: float) -> str:
    """The problem as plain text (``Q: add 2+3\\nA: 5\\n``); wrong with probability ``noise``."""
    ans = near_miss(problem, rng) if rng.random() < noise else problem["answer"]
    return f"Q: {problem['prompt']}\nA: {ans}\n"


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines (atomically); returns the number of rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def generate_dataset(out_dir: str, *, n_sft: int, n_pref: int, n_eval: int, n_pretrain: int,
                     seed: int = 0, tasks: Sequence[str] = TASKS, pretrain_noise: float = 0.3) -> Dict[str, str]:
    """Write the synthetic data set to ``out_dir`` and return the paths by role.

    Files: ``sft_train.jsonl`` (UltraChat schema), ``pref_train.jsonl`` and ``pref_eval.jsonl``
    (UltraFeedback schema, rejected = near misses), ``eval_prompts.jsonl`` (UltraChat schema;
    held out, also used for greedy task accuracy), ``pretrain.txt`` (plain text, one problem per
    paragraph). Held-out prompts never appear in any training file.
    """
    rng = random.Random(seed + 1)
    held = problems(n_eval, seed=seed + 2, tasks=tasks)
    held_set = {p["prompt"] for p in held}
    sft = problems(n_sft, seed=seed + 3, tasks=tasks, exclude=held_set, distinct=False)
    pref = problems(n_pref, seed=seed + 4, tasks=tasks, exclude=held_set, distinct=False)
    pre = problems(n_pretrain, seed=seed + 5, tasks=tasks, exclude=held_set, distinct=False)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("sft_train", "sft_train.jsonl"), ("dpo_train", "pref_train.jsonl"), ("eval_pref", "pref_eval.jsonl"),
        ("eval_prompts", "eval_prompts.jsonl"), ("pretrain", "pretrain.txt"))}
    write_jsonl(paths["sft_train"], (sft_row(p) for p in sft))
    write_jsonl(paths["dpo_train"], (preference_row(p, near_miss(p, rng)) for p in pref))
    write_jsonl(paths["eval_pref"], (preference_row(p, near_miss(p, rng)) for p in held))
    write_jsonl(paths["eval_prompts"], (sft_row(p) for p in held))
    tmp = paths["pretrain"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pre:
            f.write(pretrain_text(p, rng, noise=pretrain_noise))
    os.replace(tmp, paths["pretrain"])
    return paths


#: how many rows :func:`checkable` reads to tell synthetic (gradable) prompts from others
CHECKABLE_ROWS = 20


def checkable(rows: List[dict]) -> bool:
    """Whether the first rows' prompts are synthetic tasks (their answers can be graded)."""
    try:
        for r in rows[:CHECKABLE_ROWS]:
            solve(r["messages"][0]["content"] if r["messages"][0]["role"] == "user" else "")
        return True
    except (ValueError, KeyError, IndexError):
        return False
