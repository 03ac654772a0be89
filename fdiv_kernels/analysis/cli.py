"""``fdiv-analyze``: value analysis from checkpoints (paper Sec. 4.4-4.5).

    fdiv-analyze values --phase-dir runs/demo/sft --eval data/eval.jsonl [--out runs/demo/analysis]
        V(s0) (lse at the first response position) of held-out prompts for every checkpoint:
        JSON (also printed) + PNG curve in --out (default <phase-dir>/analysis; the paths go to stderr).
    fdiv-analyze rank --model runs/a/sft/final --model base=runs/demo/pretrain/final --data traj.jsonl
        Values at segment boundaries of each response, per model; Kendall tau between models'
        value rankings and with the outcome ranking (rows: {"prompt", "response", "score"}).
        Models are labelled NAME (NAME=PATH) or by their path relative to the paths' common root.
    fdiv-analyze align --model runs/demo/dpo/final --ref runs/demo/sft/final --pairs runs/demo/data/pref_eval.jsonl
        The implicit-reward alignment metric: DPO loss / accuracy of a model against a reference.

Exit codes: 0 done, 2 a bad argument or input file (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from .. import __version__
from ..errors import ConfigError, DataError


def _prompts_from(path: str, tok) -> List[str]:
    from ..data import load_sft, prompt_text

    return [prompt_text(tok, r["messages"]) for r in load_sft(path)]


def cmd_values(args) -> dict:
    from ..hf import load_tokenizer
    from ..runs import list_checkpoints
    from .values import value_s0_curve

    ckpts = list_checkpoints(args.phase_dir)
    if not ckpts:
        raise ConfigError(f"--phase-dir {args.phase_dir}: no checkpoint-<step> directories (a phase of a run, "
                          "e.g. runs/demo/sft)")
    prompts = _prompts_from(args.eval, load_tokenizer(ckpts[0]))[: args.limit]
    rows = value_s0_curve(args.phase_dir, prompts, backend=args.backend)
    out = args.out or os.path.join(args.phase_dir, "analysis")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "value_s0.json"), "w") as f:
        json.dump(rows, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in rows]
    mean = [r["mean"] for r in rows]
    std = [r["std"] for r in rows]
    ax.plot(steps, mean, marker="o")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("V(s0) = lse at first response position")
    ax.set_title(os.path.basename(os.path.normpath(args.phase_dir)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "value_s0.png"), dpi=120)
    plt.close(fig)
    print(json.dumps(rows, indent=1))
    print(f"fdiv-analyze: wrote {os.path.join(out, 'value_s0.png')} and {os.path.join(out, 'value_s0.json')}",
          file=sys.stderr)  # stdout carries the JSON only
    return {"rows": rows, "out": out}


def model_labels(specs: List[str]) -> List[Tuple[str, str]]:
    """``[(label, path)]`` for ``--model`` arguments, every label unique.

    ``NAME=PATH`` is labelled ``NAME``; a bare path by its path relative to the common root of
    the bare paths (``runs/a/sft/final`` and ``runs/b/sft/final`` -> ``a/sft/final``,
    ``b/sft/final``; a single path by its last component).
    """
    named, bare = [], []
    for spec in specs:
        if "=" in spec and not os.path.exists(spec):
            name, path = spec.split("=", 1)
            if not name or not path:
                raise ConfigError(f"--model {spec!r}: expected NAME=PATH or PATH")
            named.append((name, path))
        else:
            bare.append(spec)
    out = list(named)
    if bare:
        full = [os.path.abspath(p) for p in bare]
        root = os.path.commonpath(full) if len(full) > 1 else os.path.dirname(full[0])
        for p, fp in zip(bare, full):
            rel = os.path.relpath(fp, root)
            out.append((rel if rel != "." else os.path.basename(fp), p))
    seen: Dict[str, str] = {}
    for label, path in out:
        if label == "outcome":
            raise ConfigError("--model: 'outcome' is the label of the data's scores; name the model otherwise")
        if label in seen:
            raise ConfigError(f"--model: two models labelled {label!r} ({seen[label]} and {path}); "
                              "use NAME=PATH to label them")
        seen[label] = path
    return out


def _trajectories(path: str) -> List[dict]:
    from ..data import read_rows

    rows = []
    for where, r in read_rows(path):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            loc = where if isinstance(where, str) else f"{path}:{where}"
            raise DataError(f"{loc}: rows need string 'prompt' and 'response' (and a numeric 'score')")
        rows.append(r)
    return rows


def cmd_rank(args) -> dict:
    from ..hf import load_model, load_tokenizer
    from ..hf import check_model_dir
    from .ranking import rank_agreement
    from .values import segment_values

    labels = model_labels(args.model)
    for label, path in labels:
        check_model_dir(path, f"--model {label}")
    rows = _trajectories(args.data)
    values = {}
    for label, path in labels:
        model, tok = load_model(path), load_tokenizer(path)
        vals = []
        for r in rows:
            _, v = segment_values(model, tok, r["prompt"], r["response"], separator=args.separator,
                                  backend=args.backend)
            vals.extend(float(x) for x in v)
        values[label] = vals
    if all("score" in r for r in rows):
        # every segment of a response inherits the response's outcome
        n_seg = [len([s for s in r["response"].split(args.separator) if s]) for r in rows]
        values["outcome"] = [float(r["score"]) for r, n in zip(rows, n_seg) for _ in range(n)]
    table = rank_agreement(values)
    print(json.dumps(table, indent=1))
    return table


def cmd_align(args) -> dict:
    import torch

    from ..hf import load_model, load_tokenizer
    from ..data import encode_pref, load_pref
    from ..hf import check_model_dir
    from .alignment import AlignmentEval

    check_model_dir(args.model, "--model")
    check_model_dir(args.ref, "--ref")
    tok = load_tokenizer(args.model)
    pairs = encode_pref(tok, load_pref(args.pairs), max_length=args.max_length)
    ev = AlignmentEval(load_model(args.ref), pairs, pad_id=tok.pad_token_id, beta=args.beta,
                       batch_size=args.batch_size, device=torch.device("cpu"), backend=args.backend)
    res = ev(load_model(args.model))
    print(json.dumps(res, indent=1))
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdiv-analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("values", help="V(s0) curve over a phase's checkpoints")
    v.add_argument("--phase-dir", required=True)
    v.add_argument("--eval", required=True, help="held-out prompts (UltraChat-schema JSONL)")
    v.add_argument("--limit", type=int, default=64)
    v.add_argument("--out")
    r = sub.add_parser("rank", help="Kendall tau of value rankings across models and with outcomes")
    r.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a model directory, optionally labelled NAME (repeatable)")
    r.add_argument("--data", required=True, help='JSONL rows {"prompt", "response", "score"}')
    r.add_argument("--separator", default="\n")
    a = sub.add_parser("align", help="implicit-reward alignment metric (DPO loss/accuracy vs a reference)")
    a.add_argument("--model", required=True)
    a.add_argument("--ref", required=True)
    a.add_argument("--pairs", required=True, help="UltraFeedback-schema JSONL")
    a.add_argument("--beta", type=float, default=0.1)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--max-length", type=int, default=256)
    for s in (v, r, a):
        s.add_argument("--backend", default="auto")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..hf import default_deepspeed_accelerator

    default_deepspeed_accelerator()  # stdout carries the JSON results only
    try:
        {"values": cmd_values, "rank": cmd_rank, "align": cmd_align}[args.command](args)
    except ConfigError as e:  # DataError included
        print(f"fdiv-analyze: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
