"""Distil the demo's model into a smaller student with any f-divergence, on CPU (fk.distill_loss).

    python examples/distill.py                                   # every divergence, about a minute each pass
    python examples/distill.py --divergences js kl pearson --steps 300
    python examples/distill.py --run runs/demo --alpha 1.5       # the run `make demo` wrote
    python examples/distill.py --tiny --steps 5                  # seconds (tests/test_examples.py)

The teacher is the demo's final model (``make demo``: a 0.17M-parameter Llama pretrained,
SFT'd and DPO'd on four synthetic tasks; ``<run>/dpo/final``). Without a finished demo run the
script runs the demo pipeline first into a temporary directory (``fdiv-train pipeline --config
demo``, about a minute). The student is a smaller Llama (hidden 32, 2 layers: about a fifth of
the teacher's parameters) trained from scratch on the demo's SFT demonstrations, teacher-forced:
at every answer token the loss is ``D_f(P_teacher || P_student)`` over the vocabulary, fused with
both LM heads (no logits of either model are formed), plus ``--hard-label-weight`` times the NLL
of the demonstration. For each divergence asked for, the script prints the student's greedy task
accuracy on the demo's held-out prompts before and after, next to the teacher's.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

import fdiv_kernels as fk
from fdiv_kernels import hf
from fdiv_kernels.collate import collate
from fdiv_kernels.data import encode_sft, load_sft
from fdiv_kernels.train.config import load_config
from fdiv_kernels.train.evaluate import task_accuracy
from fdiv_kernels.train.modeling import build_tiny_model, param_count
from fdiv_kernels.train.pipeline import run_command

STUDENT = ["model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.intermediate_size=96"]
#: a demo small enough for --tiny (seconds): a few steps of each phase on a few hundred problems
TINY_DEMO = ["pretrain.steps=5", "sft.steps=5", "dpo.steps=3", "sft.eval_every=0", "dpo.eval_every=0",
             "sft.save_every=0", "dpo.save_every=0", "eval.num_prompts=20", "eval.batch_size=20",
             "data.synthetic.n_pretrain=200", "data.synthetic.n_sft=64", "data.synthetic.n_pref=32",
             "data.synthetic.n_eval=20"]


def teacher_run(run: str, tiny: bool) -> str:
    """A finished demo run directory: ``run`` when it has a final model, else a fresh one."""
    if os.path.isdir(os.path.join(run, "dpo", "final")):
        return run
    out = tempfile.mkdtemp(prefix="fdiv-distill-")
    print(f"no finished demo run in {run}: running the demo pipeline into {out} first")
    cfg = load_config("demo", [f"output_dir={out}", "name=demo", *(TINY_DEMO if tiny else [])])
    run_command(cfg, "pipeline", overwrite=True)
    return os.path.join(out, "demo")


def accuracy(model, tok, rows) -> float:
    return task_accuracy(model, tok, rows, max_new_tokens=10, batch_size=200, device=torch.device("cpu"))["accuracy"]


def distil(teacher, tok, examples, eval_rows, divergence: str, args) -> tuple:
    """``(accuracy before, after, seconds)`` of a fresh student distilled with ``divergence``."""
    torch.manual_seed(args.seed)
    student = build_tiny_model(load_config("demo", STUDENT).model, tok)
    before = accuracy(student, tok, eval_rows)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    wt, bt = hf.head_of(teacher)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = collate(rng.sample(examples, args.batch_size), pad_id=tok.pad_token_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            th = hf.hidden_states(teacher, ids, mask)
        h = hf.hidden_states(student, ids, mask)
        w, b = hf.head_of(student)
        out = fk.distill_loss(h, w, batch["labels"], bias=b, teacher_hidden=th, teacher_weight=wt, teacher_bias=bt,
                              divergence=divergence, alpha=args.alpha if divergence == "alpha" else None,
                              temperature=args.temperature, hard_label_weight=args.hard_label_weight, shift=True,
                              backend=args.backend)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps - 1:
            print(f"  [{divergence}] step {step:4d}  loss {float(out.loss.detach()):.4f}")
    return before, accuracy(student, tok, eval_rows), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a finished demo run (make demo); run first when missing")
    ap.add_argument("--divergences", nargs="+", default=list(fk.DISTILL_DIVERGENCES))
    ap.add_argument("--alpha", type=float, default=1.5, help="Amari's alpha for divergence alpha")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard-label-weight", type=float, default=0.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a tiny demo run and few prompts (seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    torch.set_flush_denormal(True)

    run = teacher_run(args.run, args.tiny)
    final = os.path.join(run, "dpo", "final")
    tok = hf.load_tokenizer(final)
    teacher = hf.load_model(final).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = os.path.join(run, "data")
    examples = encode_sft(tok, load_sft(os.path.join(data, "sft_train.jsonl")), max_length=48)
    eval_rows = load_sft(os.path.join(data, "eval_prompts.jsonl"))
    args.batch_size = min(args.batch_size, len(examples))
    student_params = param_count(build_tiny_model(load_config("demo", STUDENT).model, tok))
    print(f"teacher {final}: {param_count(teacher) / 1e6:.2f}M parameters, task accuracy "
          f"{100 * accuracy(teacher, tok, eval_rows):.1f}% on {len(eval_rows)} held-out prompts; student "
          f"{student_params / 1e6:.2f}M parameters; {len(examples)} demonstrations, {args.steps} steps each")
    results = []
    for d in args.divergences:
        results.append((d, *distil(teacher, tok, examples, eval_rows, d, args)))
    print(f"\n{'divergence':<18} {'before':>8} {'after':>8} {'time':>8}")
    for d, before, after, secs in results:
        name = f"alpha={args.alpha:g}" if d == "alpha" else d
        print(f"{name:<18} {100 * before:7.1f}% {100 * after:7.1f}% {secs:7.1f}s")
    print(f"done: {len(results)} divergence(s), {args.steps} steps each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
