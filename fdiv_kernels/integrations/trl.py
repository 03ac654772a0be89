"""TRL recipes: ``SFTTrainer`` with a fused f-divergence loss, ``DPOTrainer`` with fused log-probs,
``GKDTrainer`` with fused distillation by any f-divergence.

::

    from fdiv_kernels.integrations.trl import FDivSFTTrainer, FDivDPOTrainer
    trainer = FDivSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                             fdiv={"divergence": "js", "beta": 0.1}, ref_model=ref)   # ref_model optional
    trainer = FDivDPOTrainer(model=model, ref_model=ref, args=DPOConfig(beta=0.1, loss_type=["sigmoid"]), ...)
    trainer = FDivGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(lmbda=0.5, beta=0.5), ...,
                             distill={"divergence": "alpha", "alpha": 1.5})

Written against TRL 1.16 (``trl>=1.0``). Both subclasses keep TRL's data pipeline, collators,
logging and checkpointing, and only replace ``compute_loss``:

* :class:`FDivSFTTrainer` patches the policy with :func:`fdiv_kernels.integrations.transformers.apply`
  (options from ``fdiv=``) and returns the patched model's fused loss. With the default
  ``fdiv={"divergence": "sft"}`` the loss is TRL's own NLL (same ``num_items_in_batch``
  normalisation). ``ref_model=`` (optional) supplies per-token reference log-probs (``pi_ref``
  of the paper), computed under ``torch.no_grad()`` with the same fused head.
* :class:`FDivDPOTrainer` patches the policy with a :class:`~fdiv_kernels.specs.DPOSpec` built from
  TRL's ``DPOConfig``, so that its loss is :class:`fdiv_kernels.nn.FusedLinearDPOLoss` (one fused
  pass over the head, no ``[2B, T, V]`` logits); the reference's sequence log-probs come from the
  same fused head. Supported: every ``loss_type`` of TRL 1.16 (sigmoid, hinge, ipo, exo_pair,
  nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
  sigmoid_norm; :data:`TRL_TO_FK_DPO_KIND`), several with ``loss_weights`` when they share one
  normalisation of the log-probs (not ipo or sigmoid_norm with summed types), ``label_smoothing``
  where TRL reads it (not together with sigmoid, which TRL reads it for no longer, the package
  still does), ``discopop_tau``; every ``f_divergence_type`` (reverse_kl, forward_kl,
  js_divergence, alpha_divergence, with the stable scores of :mod:`fdiv_kernels.formulas.preference`)
  except with ``ipo`` or ``sigmoid_norm``; no ``ld_alpha``, no ``use_weighting``, no MoE router aux
  loss; reference from ``ref_model``, ``precompute_ref_log_probs=True`` or a PEFT adapter.

* :class:`FDivGKDTrainer` (TRL's experimental ``GKDTrainer``, on-policy distillation) computes the
  loss with :func:`fdiv_kernels.distill_loss` from both models' last hidden states and LM heads (no
  ``[B, T, V]`` logits of either model); ``GKDConfig.beta`` with the default ``js`` is exactly
  TRL's ``generalized_jsd_loss``, and every registry divergence is available
  (``distill={"divergence": ...}``); on-policy generation (``lmbda``, ``seq_kd``) is TRL's.

All override ``compute_loss``, the ``Trainer`` API's public hook for a custom loss (TRL's
``DPOTrainer.compute_loss`` only wraps its private ``_compute_loss``, which is left alone).

Metrics logged: SFT ``fdiv/reward``, ``fdiv/value_s0`` (mean implicit reward and V(s0)) and TRL's
``mean_token_accuracy`` (read off the fused pass's logits: ``fk.loss(return_token_accuracy=True)``); DPO
what TRL's ``DPOTrainer`` logs, by its names and formulas: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``entropy``,
``num_tokens``, ``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy`` (the
per-token ones from one extra no-grad tiled pass over the head,
:func:`fdiv_kernels.integrations.transformers.token_head_stats`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Dict, Mapping, Union

import torch

from .. import TRL_F_DIVERGENCES, hf
from ..api import distill_from_spec
from ..specs import DistillSpec, DPOSpec, FDivSpec, HeadSpec, PrimalSpec
from . import transformers as fk_hf

try:
    import trl as _trl
    from trl import DPOTrainer, SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("fdiv_kernels.integrations.trl needs TRL >= 1.0: pip install 'fdiv-kernels[trl]'") from e

if int(_trl.__version__.split(".")[0]) < 1:  # pragma: no cover
    raise ImportError(f"fdiv_kernels.integrations.trl is written against TRL 1.x (tested with 1.16); found "
                      f"{_trl.__version__}. Upgrade TRL, or use fdiv_kernels.nn / integrations.transformers directly")

with warnings.catch_warnings():  # TRL warns that trl.experimental is experimental
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer

__all__ = ["FDivGKDTrainer", "FDivSFTTrainer", "FDivDPOTrainer", "TRL_TO_FK_DPO_KIND", "TRL_TO_FK_F_DIVERGENCE",
           "TRL_USES_LABEL_SMOOTHING"]

#: TRL ``DPOConfig.loss_type`` -> ``fdiv_kernels.dpo_loss(loss_type=...)`` (the same names).
TRL_TO_FK_DPO_KIND = {t: t for t in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                                     "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                                     "sigmoid_norm")}
#: TRL ``DPOConfig.f_divergence_type`` -> ``fdiv_kernels.dpo_loss(divergence=...)`` (registry names: TRL
#: names the direction from the policy, the registry the generator, so TRL's reverse_kl is ``kl``)
TRL_TO_FK_F_DIVERGENCE = {t: TRL_F_DIVERGENCES[t] for t in ("reverse_kl", "forward_kl", "js_divergence",
                                                          "alpha_divergence")}
#: the TRL loss types of :data:`TRL_TO_FK_DPO_KIND` that read ``DPOConfig.label_smoothing`` (TRL 1.16's
#: sigmoid ignores it, unlike ``fdiv_kernels.dpo_loss(loss_type="sigmoid")``'s conservative DPO)
TRL_USES_LABEL_SMOOTHING = ("robust", "exo_pair", "aot", "aot_unpaired")


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


def _with_label_smoothing(options: Dict[str, Any], eps: float) -> Dict[str, Any]:
    """``fdiv=`` options with HF's ``label_smoothing_factor`` as the spec's ``label_smoothing`` (one
    value: a different one in ``fdiv=`` is an error; a primal spec takes none)."""
    spec = options.get("spec")
    given = spec.label_smoothing if isinstance(spec, FDivSpec) else options.get("label_smoothing", 0.0)
    if isinstance(spec, PrimalSpec):
        raise ValueError("label_smoothing_factor applies to an FDivSpec (fk.loss's label_smoothing), not to a "
                         "PrimalSpec")
    if given not in (0.0, eps):
        raise ValueError(f"label_smoothing_factor={eps:g} and fdiv's label_smoothing={given:g} differ; set one")
    if spec is not None:
        return {**options, "spec": dataclasses.replace(spec, label_smoothing=eps)}
    return {**options, "label_smoothing": eps}


class FDivSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the fused f-divergence objective.

    Extra keyword arguments: ``fdiv`` (a dict of :func:`fdiv_kernels.integrations.transformers.apply`
    options: ``divergence``, ``beta``, ``level``, ``values``, ``z_loss``, ``length_normalize``,
    ``backend``, ``softcap``, ``temperature``; ``ignore_index`` is always -100 as in TRL; or an
    :class:`~fdiv_kernels.specs.FDivSpec` / :class:`~fdiv_kernels.specs.PrimalSpec`) and
    ``ref_model`` (a frozen reference causal LM with the same tokenizer, optional).
    ``SFTConfig.label_smoothing_factor`` is the spec's ``label_smoothing`` (``fk.loss``'s; with the
    default ``sft`` TRL's / HF's ``LabelSmoother``, fused: no full logits; a different
    ``label_smoothing`` in ``fdiv=`` is an error).
    Not supported with it: ``loss_type="dft"``, ``compute_loss_func``, DeepSpeed sequence
    parallelism (TRL's own paths for those are bypassed; a clear error is raised).
    """

    def __init__(self, *args, fdiv: Union[Mapping[str, Any], FDivSpec, PrimalSpec, None] = None, ref_model=None,
                 **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("FDivSFTTrainer computes its own loss; do not pass compute_loss_func")
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError("FDivSFTTrainer replaces the loss: use loss_type='nll' and pick the objective with "
                             "fdiv={'divergence': ...}")
        if isinstance(fdiv, (FDivSpec, PrimalSpec)):
            self.fdiv_options: Dict[str, Any] = {"spec": fdiv}
        else:
            self.fdiv_options = dict(fdiv or {})
        if self.args.label_smoothing_factor > 0:
            self.fdiv_options = _with_label_smoothing(self.fdiv_options, float(self.args.label_smoothing_factor))
        if self.fdiv_options.get("ignore_index", -100) != -100:
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
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, return_token_accuracy=True)
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
            # TRL's mean_token_accuracy (token-weighted over ranks), from the loss's own pass
            correct = self.accelerator.gather_for_metrics(outputs.token_is_top1.sum()).sum()
            total = self.accelerator.gather_for_metrics(mask.sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        return (loss, outputs) if return_outputs else loss


class FDivDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is :class:`fdiv_kernels.nn.FusedLinearDPOLoss` (one fused pass
    over the LM head, no ``[2B, T, V]`` logits) and whose reference log-probs come from the fused head.

    Same constructor as ``DPOTrainer``. ``args.loss_type``: entries of :data:`TRL_TO_FK_DPO_KIND`
    with ``args.loss_weights`` (module docstring: what raises ``NotImplementedError``).
    Only ``compute_loss`` (the ``Trainer`` API's hook for a custom loss) is replaced.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        types = list(self.loss_types)
        unknown = [t for t in types if t not in TRL_TO_FK_DPO_KIND]
        if unknown:
            raise NotImplementedError(f"FDivDPOTrainer supports loss_type among {sorted(TRL_TO_FK_DPO_KIND)}, "
                                      f"got {unknown}")
        reads_smoothing = any(t in TRL_USES_LABEL_SMOOTHING for t in types)
        normalises_scores = [t for t in types if t in ("ipo", "sigmoid_norm")]
        unsupported = {"f_divergence_type": self.f_divergence_type not in TRL_TO_FK_F_DIVERGENCE,
                       "ld_alpha": self.ld_alpha is not None, "use_weighting": bool(self.use_weighting),
                       "MoE router aux loss (output_router_logits)": bool(getattr(self, "aux_loss_enabled", False)),
                       # TRL divides the f-divergence *scores* of summed log-ratios by the length; the fused
                       # DPO loss length-normalises the log-probs: the same only for reverse_kl
                       f"loss_type {normalises_scores} with an f_divergence_type other than reverse_kl":
                           bool(normalises_scores) and self.f_divergence_type != "reverse_kl",
                       # TRL 1.16's sigmoid reads no label_smoothing, the package's does: one value for both
                       "label_smoothing > 0 with sigmoid and a type that reads it":
                           reads_smoothing and "sigmoid" in types and self.label_smoothing > 0}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"FDivDPOTrainer does not support {bad} (use TRL's DPOTrainer for those)")
        try:
            self.fk_spec = DPOSpec(loss_type=tuple(TRL_TO_FK_DPO_KIND[t] for t in types),
                                   loss_weights=tuple(self.loss_weights), beta=self.beta,
                                   label_smoothing=self.label_smoothing if reads_smoothing else 0.0,
                                   divergence=TRL_TO_FK_F_DIVERGENCE[self.f_divergence_type],
                                   alpha=float(self.args.f_alpha_divergence_coef),
                                   discopop_tau=float(self.args.discopop_tau))
        except ValueError as err:  # e.g. types that TRL normalises differently (ipo with summed ones)
            raise NotImplementedError(f"FDivDPOTrainer: {err}") from None
        fk_hf.apply(_policy(self.model), self.fk_spec)
        if self.ref_model is not None:
            fk_hf.apply(self.accelerator.unwrap_model(self.ref_model), divergence="sft")

    @staticmethod
    def _sequence_logps(model, model_kwargs, labels):
        """Per-row sums of the completion tokens' log-probs (fused head; a model patched for NLL)."""
        return model(**model_kwargs, labels=labels).token_logp.sum(-1)

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

    def _reference_logps(self, model, model_kwargs, labels, inputs) -> torch.Tensor:
        """``[2B]`` reference sums over the completions (precomputed, a reference model, or the PEFT base)."""
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        ctx = contextlib.ExitStack()
        ref_model = self.ref_model
        if ref_model is None:  # PEFT: the policy with its adapter disabled, patched for NLL meanwhile
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            ctx.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
            ctx.enter_context(fk_hf.patched(_policy(unwrapped), divergence="sft"))
            ref_model = model
        with torch.no_grad(), ctx:
            return self._sequence_logps(ref_model, model_kwargs, labels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        ref = self._reference_logps(model, model_kwargs, labels, inputs)
        ref = ref.to(torch.float64 if ref.dtype == torch.float64 else torch.float32)
        counts = (labels[:, 1:] != -100).sum(-1).clamp(min=1)
        ref_in = ref / counts if self.fk_spec.length_normalize else ref  # the loss's normalisation
        out = model(**model_kwargs, labels=labels, ref_logp=ref_in, return_token_metrics=True)
        self._log_token_metrics(mode, out, inputs["attention_mask"])
        # TRL's reward metrics: beta * (summed) log-ratios, whatever the loss type
        pol = out.token_logp.sum(-1)  # detached, from the metrics pass
        pc, pr = pol.chunk(2)
        rc, rr = ref.chunk(2)
        chosen_r, rejected_r = self.beta * (pc - rc), self.beta * (pr - rr)
        m = self._metrics[mode]
        gather = self.accelerator.gather
        m["rewards/chosen"].append(gather(chosen_r).mean().item())
        m["rewards/rejected"].append(gather(rejected_r).mean().item())
        m["rewards/accuracies"].append(gather((chosen_r > rejected_r).float()).mean().item())
        m["rewards/margins"].append(gather(chosen_r - rejected_r).mean().item())
        m["logps/chosen"].append(gather(pc).mean().item())
        m["logps/rejected"].append(gather(pr).mean().item())
        if return_outputs:  # as TRL: the logits for compute_metrics, from an extra no-grad forward
            with torch.no_grad():
                return out.loss, model(**model_kwargs)
        return out.loss


class FDivGKDTrainer(GKDTrainer):
    """TRL's ``GKDTrainer`` (``trl.experimental.gkd``) whose loss is :func:`fdiv_kernels.distill_loss`:
    the student's and the teacher's last hidden states through their LM heads, fused, with any
    registry divergence; neither model's ``[B, T, V]`` logits are formed. Generation (on-policy with
    probability ``lmbda``, ``seq_kd``), data and logging are TRL's.

    Extra keyword arguments: ``distill``, a dict of :class:`~fdiv_kernels.specs.DistillSpec` fields
    (default ``{"divergence": "js", "beta": args.beta}``: TRL's ``generalized_jsd_loss``;
    ``reduction`` is the trainer's) or a ``DistillSpec``; ``backend`` (``"auto"``). Like TRL's, the
    loss is the mean over the completion tokens of the shifted labels (``labels != -100``), or their
    sum over ``num_items_in_batch``; the temperature is the spec's (default 1, as TRL's loss; the
    config's ``temperature`` is the sampling one). Models whose forward caps or scales the logits
    (Gemma 2/3, Cohere, Granite, ...) are refused (``ValueError``), as are sharded heads (DeepSpeed
    ZeRO-3, FSDP): the loss reads both heads as plain tensors.
    """

    def __init__(self, *args, distill: Union[Mapping[str, Any], DistillSpec, None] = None, backend: str = "auto",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(distill, DistillSpec):
            spec = distill
        else:
            options = {"divergence": "js", "beta": self.beta, **dict(distill or {})}
            if "reduction" in options:
                raise ValueError("FDivGKDTrainer sets the reduction itself (a mean over the completion tokens, or "
                                 "their sum over num_items_in_batch); remove 'reduction' from distill=")
            spec = DistillSpec(**options)
        self.distill_spec = dataclasses.replace(spec, reduction="mean")
        self.distill_head = HeadSpec(backend=backend)

    def _head_inputs(self, model, inputs):
        got = hf.head_inputs(model, inputs["input_ids"], inputs["attention_mask"], backend=self.distill_head.backend)
        if got.head.softcap is not None or got.head.temperature != 1.0:
            raise ValueError(f"FDivGKDTrainer: {type(hf.unwrap(model)).__name__} caps or scales its logits "
                             f"(softcap={got.head.softcap}, scale={1 / got.head.temperature:g}); the fused distillation "
                             f"loss reads hidden @ weight.T + bias only")
        if hf.is_zero3_param(got.weight):
            raise ValueError("FDivGKDTrainer: the LM head is sharded (DeepSpeed ZeRO-3); not supported")
        return got

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self._head_inputs(model, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self._head_inputs(self.teacher_model, inputs)
        spec = self.distill_spec if num_items_in_batch is None else dataclasses.replace(self.distill_spec,
                                                                                         reduction="sum")
        out = distill_from_spec(spec, student.hidden[:, :-1], student.weight, inputs["labels"][:, 1:],
                                bias=student.bias, teacher_hidden=teacher.hidden[:, :-1], teacher_weight=teacher.weight,
                                teacher_bias=teacher.bias, head=self.distill_head)
        loss = out.loss
        if num_items_in_batch is not None:
            n = num_items_in_batch
            loss = loss / (n.to(loss.device) if isinstance(n, torch.Tensor) else n)
        return (loss, {"loss": loss, "divergence_loss": out.divergence_loss}) if return_outputs else loss
