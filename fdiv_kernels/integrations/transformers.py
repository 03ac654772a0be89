"""Patch a Hugging Face causal LM so that ``model(..., labels=labels)`` uses the fused f-divergence loss.

::

    from fdiv_kernels.integrations import transformers as fk_hf
    fk_hf.apply(model, divergence="js", beta=0.1)      # or: with fk_hf.patched(model, ...):
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss is fused; out.logits is None
    fk_hf.unapply(model)

How it works: the patched ``forward`` runs the model's body (``model.base_model``, i.e. the module
named by ``base_model_prefix``; ``get_decoder()`` when there is none), takes
``last_hidden_state`` and the head found with ``get_output_embeddings()``, and calls
:func:`fdiv_kernels.loss` with the usual HF shift (``labels[..., 1:]`` predicted from
``hidden[..., :-1, :]``; a ``shift_labels=`` kwarg, as HF passes under context parallelism, is
used as it is). The ``[B, T, V]`` logits are never built: **the returned ``logits`` is ``None``
when labels are given**. Without labels (and in ``generate()``) the original forward runs
unchanged. The output is an :class:`FDivCausalLMOutput` (a ``CausalLMOutputWithPast``) that
also carries the per-token ``token_logp``/``token_lse``, the implicit ``reward``, ``value_s0``
and ``loss_mask`` (all aligned with the shifted labels).

Extra keyword arguments understood by the patched forward: ``ref_logp`` (reference log-probs,
``[B, T]`` per token aligned with the *unshifted* labels, or ``[B]`` per row at sequence level),
``num_items_in_batch`` (HF Trainer's token count for gradient accumulation: the loss is then a
sum divided by it, as HF does, for mean-aggregated divergences) and ``shift_labels``.

Model specifics handled from the config: Gemma-2/3 ``final_logit_softcapping`` (-> ``softcap``),
Cohere ``logit_scale``, Granite ``logits_scaling`` and Falcon-H1 ``lm_head_multiplier``
(-> ``temperature``), tied input/output embeddings (the head weight *is* the embedding; its
gradient accumulates as in HF), an LM-head bias, and DeepSpeed ZeRO-3 (the head weight is gathered
with ``deepspeed.zero.GatheredParameters``; see :mod:`fdiv_kernels.integrations.deepspeed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
from typing import Any, Dict, Optional, Tuple

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import _checks
from ..divergences import get_divergence
from ..losses import FORMS, LEVELS, VALUE_MODES, loss as fused_loss
from ..primal import get_primal
from . import deepspeed as _ds

__all__ = ["FDivCausalLMOutput", "PatchConfig", "apply", "unapply", "patched", "is_patched", "patch_config",
           "head_of", "body_of", "logit_transform", "token_head_metrics"]

_ATTR = "_fdiv_patch"
_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "ref_logp", "return_dict",
                     "return_token_metrics")


@dataclasses.dataclass
class FDivCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` (``logits`` is ``None``) plus the fused per-token statistics.

    ``token_logp``, ``token_lse``, ``loss_mask``: ``[B, T-1]`` (``[B, T]`` with ``shift_labels``),
    log-prob of each next-token label, log-sum-exp of its logits (the value V(s)), supervised
    positions. ``reward``: implicit reward (per token, or ``[B]`` at sequence level).
    ``value_s0``: ``[B]`` lse at each row's first supervised position. With
    ``return_token_metrics=True`` (what TRL's DPOTrainer logs): ``token_entropy`` (from the same
    fused pass), ``token_mean_logit`` (mean logit over the vocabulary) and ``token_is_top1``
    (the label is the argmax), all ``[B, T-1]`` and detached (:func:`token_head_metrics`).
    """

    token_logp: Optional[torch.Tensor] = None
    token_lse: Optional[torch.Tensor] = None
    reward: Optional[torch.Tensor] = None
    value_s0: Optional[torch.Tensor] = None
    loss_mask: Optional[torch.Tensor] = None
    token_entropy: Optional[torch.Tensor] = None
    token_mean_logit: Optional[torch.Tensor] = None
    token_is_top1: Optional[torch.Tensor] = None


# fields this patch fills itself; the others (cache, hidden_states, attentions) come from the body
_OWN_FIELDS = {"loss", "logits"} | ({f.name for f in dataclasses.fields(FDivCausalLMOutput)}
                                   - {f.name for f in dataclasses.fields(CausalLMOutputWithPast)})


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """Options of a patched model (see :func:`apply`); ``softcap``/``temperature`` already resolved."""

    divergence: str = "sft"
    beta: float = 1.0
    level: str = "token"
    values: str = "drop"
    z_loss: float = 0.0
    length_normalize: bool = False
    ignore_index: int = -100
    backend: str = "auto"
    softcap: Optional[float] = None
    temperature: float = 1.0
    form: str = "variational"
    alpha: float = 1.5

    @property
    def sums_over_num_items(self) -> bool:
        """Whether a ``num_items_in_batch`` kwarg makes the loss ``sum / num_items_in_batch`` (HF's
        gradient-accumulation convention). True for mean-aggregated divergences (sft, reverse_kl,
        pearson, neyman, js) without ``values="free"``, and every ``form="primal"`` loss; otherwise
        (kl, squared_hellinger: log-mean-exp) the loss stays a per-call mean."""
        if self.form == "primal":
            return True
        return get_divergence(self.divergence).aggregate == "mean" and self.values != "free"


@dataclasses.dataclass
class _PatchState:
    config: PatchConfig
    original_forward: Any
    had_instance_forward: bool
    param_names: Tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Finding the head, the body and the logit transforms
# --------------------------------------------------------------------------------------------

def head_of(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] | None)`` of the LM head found with ``get_output_embeddings()``."""
    cls = type(model).__name__
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise TypeError(f"{cls}: cannot patch, get_output_embeddings() found no LM head "
                        f"(is this a *ForCausalLM model?)")
    if any(hasattr(head, a) for a in ("lora_A", "base_layer", "modules_to_save")):
        raise TypeError(f"{cls}: cannot patch, its LM head is wrapped by an adapter ({type(head).__name__}); "
                        f"the fused head reads the plain weight and would ignore the adapter. Keep the LM head "
                        f"out of the adapter's target modules")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{cls}: cannot patch, its LM head {type(head).__name__} has no weight tensor")
    if not weight.is_floating_point():
        raise TypeError(f"{cls}: cannot patch, its LM head weight has dtype {weight.dtype} (quantized heads are "
                        f"not supported; keep the head in float/bf16, e.g. skip it in the quantization config)")
    shape = _ds.full_shape(weight)
    if len(shape) != 2:
        raise TypeError(f"{cls}: cannot patch, LM head weight has shape {tuple(shape)}, expected [V, H]")
    bias = getattr(head, "bias", None)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(_ds.full_shape(bias)) != (shape[0],):
            raise TypeError(f"{cls}: unsupported LM head bias {type(bias).__name__} "
                            f"{tuple(getattr(bias, 'shape', ()))} (expected a float tensor of shape [{shape[0]}])")
    return weight, bias


def body_of(model) -> torch.nn.Module:
    """The module that returns ``last_hidden_state``: ``model.base_model`` (``base_model_prefix``), else ``get_decoder()``."""
    body = getattr(model, "base_model", model)
    if body is model and callable(getattr(model, "get_decoder", None)):
        body = model.get_decoder()
    if body is model or body is None:
        raise TypeError(f"{type(model).__name__}: cannot patch, no body module found "
                        f"(base_model_prefix={getattr(model, 'base_model_prefix', None)!r}, get_decoder() gave the model itself)")
    return body


def logit_transform(model) -> Tuple[Optional[float], float]:
    """``(softcap, scale)`` the model's forward applies to ``lm_head(hidden)``, read from its (text) config.

    ``logits = scale * lm_head(h)`` (Cohere ``logit_scale``, Falcon-H1 ``lm_head_multiplier``,
    ``1/logits_scaling`` for Granite), then ``softcap * tanh(logits / softcap)`` (Gemma 2/3).
    """
    cfg = model.config
    cfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / float(cfg.logits_scaling)
    scale = 1.0 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{type(model).__name__}: unsupported logit scale {scale} in its config")
    if softcap is not None and scale != 1.0:
        raise NotImplementedError(f"{type(model).__name__}: both a logit scale ({scale}) and a final soft-cap "
                                  f"({softcap}) are set; the fused head supports one or the other")
    return (float(softcap) if softcap is not None else None), scale


# --------------------------------------------------------------------------------------------
# apply / unapply / patched
# --------------------------------------------------------------------------------------------

def apply(model, *, divergence: str = "sft", beta: float = 1.0, level: str = "token", values: str = "drop",
          z_loss: float = 0.0, length_normalize: bool = False, ignore_index: int = -100, backend: str = "auto",
          softcap: Optional[float] = None, temperature: float = 1.0, form: str = "variational", alpha: float = 1.5):
    """Patch ``model`` (in place; also returned) so that calls with ``labels`` compute the fused loss.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``; Llama, Mistral, Qwen2, Gemma, ...).
        divergence, beta, level, values, z_loss, length_normalize, ignore_index, backend, form, alpha:
            as in :func:`fdiv_kernels.loss` (``divergence="sft"``: HF's own cross-entropy loss).
        softcap: logit soft-cap; ``None`` takes ``config.final_logit_softcapping`` (Gemma 2/3).
        temperature: divides the logits, on top of any scale the config sets.

    Patching twice replaces the options. Raises ``TypeError`` naming the class when the model has
    no usable LM head or body.
    """
    _checks.check_choice("form", form, FORMS)
    (get_primal if form == "primal" else get_divergence)(divergence)
    _checks.check_choice("level", level, LEVELS)
    _checks.check_choice("values", values, VALUE_MODES)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    head_of(model)
    body_of(model)
    cfg_cap, scale = logit_transform(model)
    cap = softcap if softcap is not None else cfg_cap
    temp = float(temperature) / scale
    _checks.check_scalars(cap, temp)
    config = PatchConfig(divergence=divergence, beta=float(beta), level=level, values=values, z_loss=float(z_loss),
                         length_normalize=bool(length_normalize), ignore_index=int(ignore_index), backend=backend,
                         softcap=cap, temperature=temp, form=form, alpha=float(alpha))
    state = getattr(model, _ATTR, None)
    if state is not None:  # re-patch: keep the original forward, replace the options
        state.config = config
        return model
    had_instance = "forward" in vars(model)
    original = model.forward
    params = tuple(p.name for p in inspect.signature(original).parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    setattr(model, _ATTR, _PatchState(config, original, had_instance, params))

    @functools.wraps(type(model).forward)  # keep the signature: generate() and Trainer inspect it
    def forward(self, *args, **kwargs):
        return _forward(self, args, kwargs)

    model.forward = types.MethodType(forward, model)
    weight, bias = head_of(model)
    _ds.register_external(model, (weight, bias))
    return model


def unapply(model):
    """Undo :func:`apply` (a no-op on a model that is not patched); returns ``model``."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return model
    if state.had_instance_forward:
        model.forward = state.original_forward
    else:
        del model.forward
    delattr(model, _ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def patch_config(model) -> Optional[PatchConfig]:
    """The :class:`PatchConfig` of a patched model, ``None`` when it is not patched."""
    state = getattr(model, _ATTR, None)
    return None if state is None else state.config


@contextlib.contextmanager
def patched(model, **options):
    """``with patched(model, divergence="js", beta=0.1): ...`` applies the patch for the block only.

    A model that was already patched gets its previous options back on exit.
    """
    previous = getattr(model, _ATTR, None)
    old_config = previous.config if previous is not None else None
    apply(model, **options)
    try:
        yield model
    finally:
        if previous is None:
            unapply(model)
        else:
            previous.config = old_config


# --------------------------------------------------------------------------------------------
# Token metrics (TRL's logits/*, mean_token_accuracy) without [N, V] logits
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def token_head_metrics(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None, temperature: float = 1.0,
                       ignore_index: int = -100, vocab_chunk: int = 8192,
                       row_chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token: the mean logit over the vocabulary and whether the label is the argmax
    (``argmax z == label``, ties to the lowest index as ``torch.argmax``), ``[...]`` fp32 / bool,
    0 / False where ``labels == ignore_index``. ``z = cap(hidden W^T + b) / temperature`` as in
    :func:`fdiv_kernels.loss`, formed in ``[row_chunk, vocab_chunk]`` tiles of the supervised rows
    only: one extra no-grad pass over the head, never the ``[N, V]`` logits.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    mean = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
    top1 = torch.zeros(y.shape, dtype=torch.bool, device=h.device)
    rows = (y != ignore_index).nonzero().squeeze(1)
    v = weight.shape[0]
    for r0 in range(0, rows.numel(), row_chunk):
        idx = rows[r0: r0 + row_chunk]
        hr = h[idx]
        best = torch.full((idx.numel(),), -math.inf, device=h.device)
        arg = torch.zeros(idx.numel(), dtype=torch.long, device=h.device)
        total = torch.zeros(idx.numel(), dtype=torch.float32, device=h.device)
        for v0 in range(0, v, vocab_chunk):
            z = (hr @ weight[v0: v0 + vocab_chunk].T).float()
            if bias is not None:
                z = z + bias[v0: v0 + vocab_chunk].float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature
            total += z.sum(-1)
            m, a = z.max(-1)
            better = m > best  # strict: an earlier chunk keeps a tie, as argmax does
            best, arg = torch.where(better, m, best), torch.where(better, a + v0, arg)
        mean[idx] = total / v
        top1[idx] = arg == y[idx]
    return mean.view(labels.shape), top1.view(labels.shape)


def _gather_dtensor(t):
    """The full value of an FSDP2 (DTensor) head parameter, differentiably. Its gradient is a
    per-rank partial sum, averaged over ranks on the way back (one reduce-scatter), as FSDP2
    averages every other gradient: ``full_tensor()``'s default would treat it as replicated and
    keep each rank's own slice unreduced."""
    if not hasattr(t, "full_tensor"):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


# --------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------

def _forward(model, args: tuple, kwargs: Dict[str, Any]):
    state: _PatchState = getattr(model, _ATTR)
    if len(args) > len(state.param_names):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments; pass them by keyword")
    call = dict(zip(state.param_names, args))
    dup = set(call) & set(kwargs)
    if dup:
        raise TypeError(f"{type(model).__name__}.forward got multiple values for {sorted(dup)}")
    call.update(kwargs)
    labels, shift_labels = call.get("labels"), call.get("shift_labels")
    if (labels is None and shift_labels is None) or call.get("fused_lm_head"):
        return state.original_forward(*args, **kwargs)  # inference, generate(), TRL's own fused head
    cfg = state.config
    return_dict = call.get("return_dict")
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    num_items = call.get("num_items_in_batch")
    ref_logp = call.get("ref_logp")
    body_kwargs = {k: v for k, v in call.items() if k not in _HEAD_ONLY_KWARGS}
    body_out = body_of(model)(**body_kwargs)
    hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]

    weight, bias = head_of(model)
    if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors: gather (differentiably)
        weight, bias = _gather_dtensor(weight), _gather_dtensor(bias)
    if shift_labels is None:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        if ref_logp is not None and ref_logp.dim() == labels.dim() and ref_logp.shape[-1] == labels.shape[-1] + 1:
            ref_logp = ref_logp[..., 1:]
    else:
        labels = shift_labels
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    if ref_logp is not None:
        ref_logp = ref_logp.to(weight.device)
    as_sum = num_items is not None and cfg.sums_over_num_items
    with _ds.gathered(weight, bias):
        if hidden.dtype != weight.dtype:  # e.g. fp32 norm output with a bf16 head under autocast
            hidden = hidden.to(weight.dtype)
        metrics = bool(call.get("return_token_metrics"))
        out = fused_loss(hidden, weight, labels, bias=bias, divergence=cfg.divergence, ref_logp=ref_logp,
                         beta=cfg.beta, level=cfg.level, ignore_index=cfg.ignore_index,
                         reduction="sum" if as_sum else "mean", backend=cfg.backend,
                         length_normalize=cfg.length_normalize, values=cfg.values, z_loss=cfg.z_loss,
                         softcap=cfg.softcap, temperature=cfg.temperature, form=cfg.form, alpha=cfg.alpha,
                         return_entropy=metrics)
        extra_metrics = {}
        if metrics:
            mean_logit, is_top1 = token_head_metrics(hidden, weight, labels, bias=bias, softcap=cfg.softcap,
                                                     temperature=cfg.temperature, ignore_index=cfg.ignore_index)
            extra_metrics = {"token_entropy": out.entropy.detach(), "token_mean_logit": mean_logit,
                             "token_is_top1": is_top1}
    loss = out.loss
    if as_sum:
        loss = loss / torch.as_tensor(num_items, device=loss.device).to(loss.dtype)
    extras = {f.name: getattr(body_out, f.name) for f in dataclasses.fields(FDivCausalLMOutput)
              if f.name not in _OWN_FIELDS and hasattr(body_out, f.name)}
    result = FDivCausalLMOutput(loss=loss, logits=None, token_logp=out.logp, token_lse=out.lse, reward=out.reward,
                                value_s0=out.value_s0, loss_mask=out.mask, **extra_metrics, **extras)
    return result if return_dict else result.to_tuple()
