"""The three phases as :class:`~fdiv_kernels.train.trainer.PhaseSpec` implementations.

* :class:`PretrainPhase`: next-token NLL on plain text windows.
* :class:`SFTPhase`: ``fk.loss`` with the configured divergence; reference log-probs of the start
  model per batch (no_grad) when the divergence uses them; optional App. D ``mix_dpo`` term.
* :class:`DPOPhase`: :class:`fdiv_kernels.nn.FusedLinearDPOLoss` (sigmoid / ipo / simpo / ...) with
  reference log-probs per batch in the loss's normalisation.

Evaluation every ``eval_every`` steps: implicit-reward alignment on held-out pairs against the
phase's start model, and ``kl_ref_heldout`` (mean per-token ``logp - ref_logp`` of the held-out
answers, start model as reference).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import DPOConfig, EvalConfig, PretrainConfig, SFTConfig
from ..collate import collate, collate_pairs
from .accumulate import add_linear
from ..analysis.alignment import AlignmentEval
from .evaluate import mean_logratio
from .steps import (
    Norm,
    adapt_lambda,
    count_tokens,
    dpo_counts,
    dpo_micro,
    mix_dpo_micro,
    pretrain_micro,
    reference_pair_logps,
    reference_token_logp,
    sft_counts,
    sft_micro,
    sft_units,
)
from .trainer import PhaseSpec

#: multipliers of the deterministic choice of mix-DPO pairs for a batch's example indices
#: (``(index * a + position * b) % num_pairs``; fixed: a resumed run picks the same pairs)
_PAIR_HASH = (2654435761, 40503)


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def needs_reference(cfg: SFTConfig) -> bool:
    """Whether SFT feeds reference log-probs to the loss (``reference`` = auto/start/none)."""
    if cfg.reference not in ("auto", "start", "none"):
        raise ValueError(f"sft.reference must be auto, start or none, got {cfg.reference!r}")
    if cfg.reference == "auto":
        return cfg.loss_spec().divergence.name != "tv"
    return cfg.reference == "start"


class _Evaluating:
    """Alignment + held-out KL against a fixed reference (the phase's start model)."""

    def _setup_eval(self, ref_model, eval_pairs, kl_batches, *, pad_id, beta, device, backend, batch_size):
        self._align = (AlignmentEval(ref_model, eval_pairs, pad_id=pad_id, beta=beta, batch_size=batch_size,
                                     device=device, backend=backend) if (ref_model is not None and eval_pairs) else None)
        self._kl_ref, self._kl_batches, self._backend = ref_model, kl_batches or [], backend

    def evaluate(self, model) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self._align is not None:
            out.update(self._align(model))
        if self._kl_ref is not None and self._kl_batches:
            v = mean_logratio(model, self._kl_ref, self._kl_batches, backend=self._backend)
            if v is not None:
                out["kl_ref_heldout"] = v
        return out


class PretrainPhase(PhaseSpec):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, examples: Sequence[dict], *, pad_id: int, device, backend: str):
        self.cfg, self.examples, self.pad_id, self.device, self.backend = cfg, list(examples), pad_id, device, backend

    def num_examples(self) -> int:
        return len(self.examples)

    def collate(self, indices):
        return _to(collate([self.examples[i] for i in indices], pad_id=self.pad_id), self.device)

    def units(self, batch) -> float:
        return count_tokens(batch)

    def micro(self, module, batch, norm: Norm):
        return pretrain_micro(module, batch, norm=norm, backend=self.backend)


class SFTPhase(_Evaluating, PhaseSpec):
    name = "sft"

    def __init__(self, cfg: SFTConfig, examples: Sequence[dict], *, pad_id: int, device, backend: str,
                 ref_model=None, pairs: Optional[Sequence[dict]] = None, eval_pairs: Optional[Sequence[dict]] = None,
                 kl_batches: Optional[List[dict]] = None, align_beta: float = 0.1,
                 eval_cfg: EvalConfig = EvalConfig()):
        self.cfg, self.examples, self.pad_id, self.device, self.backend = cfg, list(examples), pad_id, device, backend
        self.use_ref = needs_reference(cfg)
        if (self.use_ref or cfg.mix_dpo.enabled) and ref_model is None:
            raise ValueError(f"SFT with divergence {cfg.divergence!r} (reference={cfg.reference}) or mix_dpo needs a "
                             "reference model")
        self.ref = ref_model
        self.pairs = list(pairs or [])
        if cfg.mix_dpo.enabled and not self.pairs:
            raise ValueError("sft.mix_dpo.enabled needs preference data (data.dpo_train)")
        self.lam = cfg.mix_dpo.lambda_init
        self._setup_eval(ref_model, eval_pairs, kl_batches, pad_id=pad_id, beta=align_beta, device=device,
                         backend=backend, batch_size=eval_cfg.align_batch_size)

    def num_examples(self) -> int:
        return len(self.examples)

    def collate(self, indices):
        b = _to(collate([self.examples[i] for i in indices], pad_id=self.pad_id), self.device)
        if self.cfg.mix_dpo.enabled:
            n = len(self.pairs)
            k = self.cfg.mix_dpo.batch_size or len(indices)
            pidx = [(i * _PAIR_HASH[0] + j * _PAIR_HASH[1]) % n for j, i in enumerate((list(indices) * k)[:k])]
            b["pairs"] = _to(collate_pairs([self.pairs[i] for i in pidx], pad_id=self.pad_id), self.device)
        return b

    def units(self, batch) -> float:
        return sft_units(batch, self.cfg)

    def counts(self, batch):
        return sft_counts(batch)

    def micro(self, module, batch, norm: Norm):
        ref_logp = reference_token_logp(self.ref, batch, backend=self.backend) if self.use_ref else None
        loss, st = sft_micro(module, batch, cfg=self.cfg, ref_logp=ref_logp, norm=norm, backend=self.backend)
        if self.cfg.mix_dpo.enabled:
            pb = batch["pairs"]
            ref = reference_pair_logps(self.ref, pb, spec=self.cfg.mix_dpo.spec, backend=self.backend)
            # pairs are weighted per micro-batch (mean) so lambda means the same at any accumulation
            pnorm = Norm(pb["input_ids"].shape[0] // 2 * norm.num_micro, norm.num_micro, norm.world_size)
            extra, st2 = mix_dpo_micro(module, pb, cfg=self.cfg.mix_dpo, lam=self.lam, ref=ref, norm=pnorm,
                                       backend=self.backend)
            loss = add_linear(loss, extra)
            st["loss"] = (st["loss"][0] + float(extra.detach()) / norm.world_size, 0.0)
            st.update(st2)
        return loss, st

    def after_step(self, metrics):
        if not self.cfg.mix_dpo.enabled:
            return {}
        used = self.lam
        self.lam = adapt_lambda(self.lam, metrics["mix_dpo_accuracy"], self.cfg.mix_dpo)
        return {"mix_lambda": used}

    def state_dict(self):
        return {"mix_lambda": self.lam}

    def load_state_dict(self, state):
        self.lam = float(state.get("mix_lambda", self.lam))


class DPOPhase(_Evaluating, PhaseSpec):
    name = "dpo"

    def __init__(self, cfg: DPOConfig, pairs: Sequence[dict], *, pad_id: int, device, backend: str, ref_model=None,
                 eval_ref=None, eval_pairs: Optional[Sequence[dict]] = None, kl_batches: Optional[List[dict]] = None,
                 eval_cfg: EvalConfig = EvalConfig()):
        self.cfg, self.pairs, self.pad_id, self.device, self.backend = cfg, list(pairs), pad_id, device, backend
        self.spec = cfg.spec
        if self.spec.needs_reference and ref_model is None:
            raise ValueError(f"DPO loss_type {cfg.loss_type!r} needs a reference model")
        self.ref = ref_model if self.spec.needs_reference else None
        # the alignment metric is a sigmoid DPO loss: the phase's beta when it is one, else eval.align_beta
        beta = cfg.beta if cfg.loss_type == "sigmoid" else eval_cfg.align_beta
        self._setup_eval(eval_ref, eval_pairs, kl_batches, pad_id=pad_id, beta=beta, device=device, backend=backend,
                         batch_size=eval_cfg.align_batch_size)

    def num_examples(self) -> int:
        return len(self.pairs)

    def collate(self, indices):
        return _to(collate_pairs([self.pairs[i] for i in indices], pad_id=self.pad_id), self.device)

    def units(self, batch) -> float:
        return batch["input_ids"].shape[0] // 2

    def counts(self, batch):
        return dpo_counts(batch)

    def micro(self, module, batch, norm: Norm):
        ref = (reference_pair_logps(self.ref, batch, spec=self.spec, backend=self.backend)
               if self.ref is not None else None)
        return dpo_micro(module, batch, cfg=self.cfg, ref=ref, norm=norm, backend=self.backend)
