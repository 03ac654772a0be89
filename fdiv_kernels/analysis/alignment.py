"""The implicit-reward alignment metric (paper Sec. 4.5): how well a model's implicit reward
``beta * log(pi / pi_ref)`` ranks held-out preference pairs.

:class:`AlignmentEval` computes the DPO loss (sigmoid, ``beta``), accuracy and margin of a model
against a fixed reference with :class:`fdiv_kernels.nn.FusedLinearDPOLoss` on the fused head
(:mod:`fdiv_kernels.hf`); the reference's sequence log-probs are computed once and cached. The
trainer evaluates with it every ``eval_every`` steps; ``fdiv-analyze align`` runs it on two
saved models.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..hf import dpo_loss_module, head_inputs, unwrap
from ..specs import DPOSpec
from ..collate import IGNORE_INDEX, collate_pairs


def _pair_inputs(model, batch, backend: str):
    x = head_inputs(model, batch["input_ids"], batch["attention_mask"], backend=backend)
    return x._replace(hidden=x.hidden[:, :-1]), batch["labels"][:, 1:]


class AlignmentEval:
    """DPO loss / accuracy / margin of a model vs. a fixed reference on held-out pairs.

    ``pairs``: encoded preference pairs (:func:`fdiv_kernels.train.data.encode_pref`), collated in
    batches of ``batch_size``. Calling it with a model returns ``{"align_dpo_loss",
    "align_accuracy", "align_margin"}`` (means over pairs).
    """

    def __init__(self, ref_model, pairs: Sequence[dict], *, pad_id: int, beta: float, batch_size: int,
                 device: torch.device, backend: str = "auto"):
        self.spec, self.backend = DPOSpec(loss_type="sigmoid", beta=beta), backend
        self.beta = beta
        self.batches = [{k: v.to(device) for k, v in collate_pairs(pairs[s: s + batch_size], pad_id=pad_id).items()}
                        for s in range(0, len(pairs), batch_size)]
        with torch.no_grad():
            self.refs = [self._loss_fn(x).sequence_logps(x.hidden, x.weight, y, bias=x.bias)
                         for x, y in (_pair_inputs(ref_model, b, backend) for b in self.batches)]

    def _loss_fn(self, x):
        return dpo_loss_module(self.spec, x.head, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def __call__(self, model) -> Dict[str, float]:
        m = unwrap(model)  # train/eval mode; the forward runs through ``model`` (an FSDP2 root needs it)
        was = m.training
        m.eval()
        losses, accs, margins = [], [], []
        for b, r in zip(self.batches, self.refs):
            x, y = _pair_inputs(model, b, self.backend)
            out = self._loss_fn(x)(x.hidden, x.weight, y, bias=x.bias, ref_logp=r, return_output=True)
            losses.append(out.losses)
            accs.append((out.chosen_rewards > out.rejected_rewards).float())
            margins.append(out.chosen_rewards - out.rejected_rewards)
        m.train(was)
        cat = torch.cat
        return {"align_dpo_loss": float(cat(losses).mean()), "align_accuracy": float(cat(accs).mean()),
                "align_margin": float(cat(margins).mean())}
