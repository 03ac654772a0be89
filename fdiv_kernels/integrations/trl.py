"""TRL recipes: ``SFTTrainer`` with a fused f-divergence loss, ``DPOTrainer`` with fused log-probs.

::

    from fdiv_kernels.integrations.trl import FDivSFTTrainer, FDivDPOTrainer
    trainer = FDivSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                             fdiv={"divergence": "js", "beta": 0.1}, ref_model=ref)   # ref_model optional
    trainer = FDivDPOTrainer(model=model, ref_model=ref, args=DPOConfig(beta=0.1, loss_type=["sigmoid"]), ...)

Written against TRL 1.16 (``trl>=1.0``). Both subclasses keep TRL's data pipeline, collators,
logging and checkpointing, and only replace ``compute_loss``:

* :class:`FDivSFTTrainer` patches the policy with :func:`fdiv_kernels.integrations.transformers.apply`
  (options from ``fdiv=``) and returns the patched model's fused loss. With the default
  ``fdiv={"divergence": "sft"}`` the loss is TRL's own NLL (same ``num_items_in_batch``
  normalisation). ``ref_model=`` (optional) supplies per-token reference log-probs (``pi_ref``
  of the paper), computed under ``torch.no_grad()`` with the same fused head.
* :class:`FDivDPOTrainer` computes the sequence log-probs of policy and reference with the fused
  head (no ``[2B, T, V]`` logits) and the loss with :func:`fdiv_kernels.dpo_loss`. Supported:
  ``loss_type`` = one of ``sigmoid``, ``ipo`` (length-averaged, as TRL), ``hinge``, ``robust``;
  every ``f_divergence_type`` (reverse_kl, forward_kl, js_divergence, alpha_divergence, with the
  stable scores of :func:`fdiv_kernels.dpo.f_divergence_score`); no ``ld_alpha``, no
  ``use_weighting``; reference from ``ref_model``, ``precompute_ref_log_probs=True`` or a PEFT adapter.

Metrics logged: SFT ``fdiv/reward``, ``fdiv/value_s0`` (mean implicit reward and V(s0)); DPO
what TRL's ``DPOTrainer`` logs, by its names and formulas: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``entropy``
(from the fused pass), ``num_tokens``, ``logits/chosen``, ``logits/rejected`` and
``mean_token_accuracy`` (one extra no-grad tiled pass over the head,
:func:`fdiv_kernels.integrations.transformers.token_head_metrics`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Mapping, Optional

import torch

from ..dpo import dpo_loss
from . import transformers as fk_hf

try:
    import trl as _trl
    from trl import DPOTrainer, SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("fdiv_kernels.integrations.trl needs TRL >= 1.0: pip install 'fdiv-kernels[trl]'") from e

if int(_trl.__version__.split(".")[0]) < 1:  # pragma: no cover
    raise ImportError(f"fdiv_kernels.integrations.trl is written against TRL 1.x (tested with 1.16); found "
                      f"{_trl.__version__}. Upgrade TRL, or use fdiv_kernels.nn / integrations.transformers directly")

__all__ = ["FDivSFTTrainer", "FDivDPOTrainer", "TRL_TO_FK_DPO_KIND", "TRL_TO_FK_F_DIVERGENCE"]

#: TRL ``DPOConfig.loss_type`` -> ``fdiv_kernels.dpo_loss(kind=...)``.
TRL_TO_FK_DPO_KIND = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}
#: TRL ``DPOConfig.f_divergence_type`` -> ``fdiv_kernels.dpo_loss(f_divergence=...)``.
TRL_TO_FK_F_DIVERGENCE = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js_divergence": "js",
                          "alpha_divergence": "alpha"}


def _policy(model):
    """The HF model inside a (possibly PEFT-wrapped) policy: the one to patch."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _prepare_ref(trainer, ref_model):
    """Freeze, patch (fused per-token log-probs) and place the reference model as TRL's DPOTrainer does."""
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if fk_hf.is_patched(ref_model):
        fk_hf.unapply(ref_model)
    fk_hf.apply(ref_model, divergence="sft")
    from trl.models import prepare_deepspeed, prepare_fsdp

    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def _tp_size(trainer) -> int:
    get = getattr(trainer, "get_tp_size", None)
    return int(get()) if callable(get) else 1


class FDivSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the fused f-divergence objective.

    Extra keyword arguments: ``fdiv`` (a dict of :func:`fdiv_kernels.integrations.transformers.apply`
    options: ``divergence``, ``beta``, ``level``, ``values``, ``z_loss``, ``length_normalize``,
    ``backend``, ``softcap``, ``temperature``; ``ignore_index`` is always -100 as in TRL) and
    ``ref_model`` (a frozen reference causal LM with the same tokenizer, optional).
    Not supported with it: ``loss_type="dft"``, ``label_smoothing_factor``, ``compute_loss_func``,
    DeepSpeed sequence parallelism (TRL's own paths for those are bypassed; a clear error is raised).
    """

    def __init__(self, *args, fdiv: Optional[Mapping[str, Any]] = None, ref_model=None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("FDivSFTTrainer computes its own loss; do not pass compute_loss_func")
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll" or self.args.label_smoothing_factor > 0:
            raise ValueError("FDivSFTTrainer replaces the loss: use loss_type='nll' and label_smoothing_factor=0 "
                             "and pick the objective with fdiv={'divergence': ...}")
        self.fdiv_options: Dict[str, Any] = dict(fdiv or {})
        if "ignore_index" in self.fdiv_options and self.fdiv_options["ignore_index"] != -100:
            raise ValueError("TRL marks unsupervised tokens with -100; fdiv['ignore_index'] must be -100")
        fk_hf.apply(_policy(self.model), **self.fdiv_options)
        self.ref_model = _prepare_ref(self, ref_model) if ref_model is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self.ref_model(**inputs)
            inputs["ref_logp"] = ref.token_logp  # [B, T-1], aligned with the shifted labels
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        cfg = fk_hf.patch_config(_policy(self.accelerator.unwrap_model(model))) or fk_hf.PatchConfig()
        if num_items_in_batch is not None:
            if cfg.sums_over_num_items:
                # like Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages
                if self.args.average_tokens_across_devices:
                    loss = loss * (self.accelerator.num_processes // _tp_size(self))
            else:
                # a per-micro-batch mean (logmeanexp divergences, values="free"): Trainer will not divide it
                loss = loss / self.current_gradient_accumulation_steps
        mask = outputs.loss_mask
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            reward = outputs.reward
            r = (reward * mask).sum() / n if reward.shape == mask.shape else reward.mean()
            self._metrics[mode]["fdiv/reward"].append(self.accelerator.gather_for_metrics(r).mean().item())
            v0 = self.accelerator.gather_for_metrics(outputs.value_s0.mean()).mean().item()
            self._metrics[mode]["fdiv/value_s0"].append(v0)
        return (loss, outputs) if return_outputs else loss


class FDivDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with fused sequence log-probs and :func:`fdiv_kernels.dpo_loss`.

    Same constructor as ``DPOTrainer``. ``args.loss_type`` must be a single entry among
    :data:`TRL_TO_FK_DPO_KIND`; the rest of TRL's DPO variants raise ``NotImplementedError``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.loss_types) != 1 or self.loss_types[0] not in TRL_TO_FK_DPO_KIND:
            raise NotImplementedError(f"FDivDPOTrainer supports loss_type one of {sorted(TRL_TO_FK_DPO_KIND)}, "
                                      f"got {self.loss_types}")
        unsupported = {"f_divergence_type": self.f_divergence_type not in TRL_TO_FK_F_DIVERGENCE,
                       "ld_alpha": self.ld_alpha is not None, "use_weighting": bool(self.use_weighting)}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"FDivDPOTrainer does not support {bad} (use TRL's DPOTrainer for those)")
        self.fk_kind = TRL_TO_FK_DPO_KIND[self.loss_types[0]]
        self.fk_f_divergence = TRL_TO_FK_F_DIVERGENCE[self.f_divergence_type]
        fk_hf.apply(_policy(self.model), divergence="sft")
        if self.ref_model is not None:
            fk_hf.apply(self.accelerator.unwrap_model(self.ref_model), divergence="sft")

    def _sequence_logps(self, model, model_kwargs, labels, *, outputs: bool = False):
        """Per-row sums of the completion tokens' log-probs (fused head), and the model output."""
        out = model(**model_kwargs, labels=labels, return_token_metrics=outputs)
        s = out.token_logp.sum(-1)
        return (s, out) if outputs else s

    def _log_token_metrics(self, mode: str, out, attention_mask: torch.Tensor) -> None:
        """TRL's ``entropy``, ``num_tokens``, ``logits/chosen``, ``logits/rejected`` and
        ``mean_token_accuracy``, computed as TRL's DPOTrainer does (token-weighted over ranks)."""
        gather = self.accelerator.gather_for_metrics
        mask = out.loss_mask
        m = self._metrics[mode]
        n = gather(mask.sum()).sum()
        m["entropy"].append((gather((out.token_entropy * mask).sum()).sum() / n).item() if n > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(attention_mask.sum()).sum().item() // _tp_size(self)
        m["num_tokens"] = [self._total_train_tokens]
        for name, logits, msk in zip(("chosen", "rejected"), out.token_mean_logit.chunk(2), mask.chunk(2)):
            tot, cnt = gather(logits[msk].sum()).sum().item(), gather(msk.sum()).sum().item()
            m[f"logits/{name}"].append(tot / cnt if cnt > 0 else 0.0)
        top1, msk = out.token_is_top1.chunk(2)[0], mask.chunk(2)[0]
        correct, total = gather((top1 & msk).sum()).sum(), gather(msk.sum()).sum()
        m["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)

    def _reference_logps(self, model, model_kwargs, labels, inputs):
        """The reference's per-row sums (precomputed, a reference model, or the PEFT base)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]  # sums over the completion
        ctx = contextlib.nullcontext()
        ref_model = self.ref_model
        if ref_model is None:  # PEFT: the policy with its adapter disabled is the reference
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            ref_model = model
        with torch.no_grad(), ctx:
            ref = self._sequence_logps(ref_model, model_kwargs, labels)
        return ref.chunk(2)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        pol, out = self._sequence_logps(model, model_kwargs, labels, outputs=True)
        self._log_token_metrics(mode, out, inputs["attention_mask"])
        pc, pr = pol.chunk(2)
        rc, rr = (r.to(pc.dtype) for r in self._reference_logps(model, model_kwargs, labels, inputs))
        lc, lr = pc, pr
        if self.fk_kind == "ipo":  # TRL's IPO averages the log-ratios over the completion tokens
            nc, nr = out.loss_mask.sum(-1).clamp(min=1).to(pc.dtype).chunk(2)
            lc, lr, rc_l, rr_l = pc / nc, pr / nr, rc / nc, rr / nr
        else:
            rc_l, rr_l = rc, rr
        eps = self.label_smoothing if self.fk_kind == "robust" else 0.0
        res = dpo_loss(lc, lr, rc_l, rr_l, beta=self.beta, kind=self.fk_kind, label_smoothing=eps,
                       f_divergence=self.fk_f_divergence, f_alpha=float(self.args.f_alpha_divergence_coef))
        # TRL's reward metrics: beta * (summed) log-ratios, whatever the loss type
        chosen_r, rejected_r = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        m = self._metrics[mode]
        gather = self.accelerator.gather
        m["rewards/chosen"].append(gather(chosen_r).mean().item())
        m["rewards/rejected"].append(gather(rejected_r).mean().item())
        m["rewards/accuracies"].append(gather((chosen_r > rejected_r).float()).mean().item())
        m["rewards/margins"].append(gather(chosen_r - rejected_r).mean().item())
        m["logps/chosen"].append(gather(pc.detach()).mean().item())
        m["logps/rejected"].append(gather(pr.detach()).mean().item())
        if return_outputs:
            return res.loss, {"chosen_logps": pc.detach(), "rejected_logps": pr.detach()}
        return res.loss
