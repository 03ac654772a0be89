"""Patch a Hugging Face causal LM so that ``model(..., labels=labels).loss`` is the fused f-divergence loss.

The two-line drop-in::

    from fdiv_kernels.integrations import transformers as fk_hf
    fk_hf.apply(model, divergence="js", beta=0.5)     # model(..., labels=...) now fused; logits is None

``model(...)`` without labels and ``model.generate(...)`` are unchanged; ``fk_hf.unapply(model)``
(or ``with fk_hf.patched(model, ...):``) restores the model.

Run: ``python examples/hf_patch.py --tiny --steps 5`` (offline tiny Llama, CPU), or
``python examples/hf_patch.py --model /path/to/hf/model --steps 50`` for a real checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import load_model_and_tokenizer, sft_texts

from fdiv_kernels.integrations import transformers as fk_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="offline tiny Llama and tokenizer (the default without --model)")
    p.add_argument("--model", default=None, help="a local path or hub id for from_pretrained")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--divergence", default="js")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model, tok = load_model_and_tokenizer(None if args.tiny else args.model)
    model.to(args.device)
    batch = tok(sft_texts()[:8], return_tensors="pt", padding=True).to(args.device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    # 1. divergence="sft" reproduces HF's own loss
    hf_loss = model(**batch, labels=labels).loss
    with fk_hf.patched(model, divergence="sft"):
        fused = model(**batch, labels=labels)
    print(f"check: HF loss {hf_loss.item():.6f}, fused sft loss {fused.loss.item():.6f}, logits={fused.logits}")

    # 2. train with an f-divergence anchored on a frozen copy of the starting model
    ref_model = fk_hf.apply(copy.deepcopy(model).eval(), divergence="sft")
    fk_hf.apply(model, divergence=args.divergence, beta=args.beta)  # the drop-in
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        with torch.no_grad():
            ref_logp = ref_model(**batch, labels=labels).token_logp  # [B, T-1] per-token reference log-probs
        out = model(**batch, labels=labels, ref_logp=ref_logp)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if not math.isfinite(out.loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        mask = out.loss_mask
        print(f"step {step}: {args.divergence} loss {out.loss.item():.4f}, "
              f"mean reward {(out.reward * mask).sum().item() / mask.sum().item():.4f}")

    # 3. generation is untouched by the patch
    prompt = tok(["the cat"], return_tensors="pt").to(args.device)
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    print("generate:", tok.decode(gen[0]))
    fk_hf.unapply(model)
    print("unpatched:", not fk_hf.is_patched(model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
