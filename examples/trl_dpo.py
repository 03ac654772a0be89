"""TRL ``DPOTrainer`` with fused sequence log-probs and ``fdiv_kernels.dpo_loss``: swap the class.

The drop-in::

    from fdiv_kernels.integrations.trl import FDivDPOTrainer      # instead of trl.DPOTrainer
    trainer = FDivDPOTrainer(model=..., ref_model=ref, args=DPOConfig(beta=0.1, loss_type=["sigmoid"]), ...)

Supported ``loss_type``: sigmoid, ipo, hinge, robust; every ``f_divergence_type``.
Run: ``python examples/trl_dpo.py --tiny --steps 5`` (offline tiny Llama, CPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny import checkpointing, load_model_and_tokenizer, preference_pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="offline tiny Llama and tokenizer (the default without --model)")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"])
    p.add_argument("--f-divergence", default="reverse_kl",
                   choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)

    import datasets
    from trl import DPOConfig

    from fdiv_kernels.integrations.trl import FDivDPOTrainer

    model, tok = load_model_and_tokenizer(None if args.tiny else args.model)
    cpu = not torch.cuda.is_available()
    config = DPOConfig(output_dir=args.output_dir or tempfile.mkdtemp(prefix="fdiv_dpo_"), max_steps=args.steps,
                       per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=cpu, bf16=not cpu, **checkpointing(DPOConfig, not args.tiny),
                       beta=args.beta, loss_type=[args.loss_type], f_divergence_type=args.f_divergence,
                       label_smoothing=0.1 if args.loss_type == "robust" else 0.0,
                       deepspeed=args.deepspeed, disable_tqdm=True)
    trainer = FDivDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict(preference_pairs()))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"bad losses: {losses}")
    print(f"done: {len(losses)} steps, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}, "
          f"last reward accuracy {logs[-1].get('rewards/accuracies')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
