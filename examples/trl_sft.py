"""TRL ``SFTTrainer`` with the fused f-divergence loss: swap the class, add ``fdiv=``.

The drop-in::

    from fdiv_kernels.integrations.trl import FDivSFTTrainer      # instead of trl.SFTTrainer
    trainer = FDivSFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., processing_class=tok,
                             fdiv={"divergence": "js", "beta": 0.5}, ref_model=ref)   # ref_model optional

Run: ``python examples/trl_sft.py --tiny --steps 5`` (offline tiny Llama, CPU). Multi-GPU with
DeepSpeed ZeRO-3: ``accelerate launch --num_processes 8 examples/trl_sft.py --model <path>
--deepspeed examples/configs/zero3.json`` (see examples/README.md).
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
from _tiny import checkpointing, load_model_and_tokenizer, sft_texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="offline tiny Llama and tokenizer (the default without --model)")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--divergence", default="js")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--no-ref", action="store_true", help="no reference model (pi_ref = 1)")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config, e.g. examples/configs/zero3.json")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)

    import datasets
    from trl import SFTConfig

    from fdiv_kernels.integrations.trl import FDivSFTTrainer

    model, tok = load_model_and_tokenizer(None if args.tiny else args.model)
    ref_model = None if args.no_ref else copy.deepcopy(model)
    cpu = not torch.cuda.is_available()
    config = SFTConfig(output_dir=args.output_dir or tempfile.mkdtemp(prefix="fdiv_sft_"), max_steps=args.steps,
                       per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=cpu, bf16=not cpu, **checkpointing(SFTConfig, not args.tiny),
                       deepspeed=args.deepspeed, disable_tqdm=True)
    trainer = FDivSFTTrainer(model=model, args=config, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"text": sft_texts()}),
                             fdiv={"divergence": args.divergence, "beta": args.beta}, ref_model=ref_model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"bad losses: {losses}")
    print(f"done: {len(losses)} steps, first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
