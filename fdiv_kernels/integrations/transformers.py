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
gradient accumulates as in HF), an LM-head bias, DeepSpeed ZeRO-3 (the head weight is gathered
with ``deepspeed.zero.GatheredParameters``; see :func:`fdiv_kernels.hf.gathered`), FSDP2 (gathered
with ``full_tensor()``) and tensor parallelism: an ``lm_head`` parallelised with
``parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})`` stays split along the
vocabulary, and the loss runs vocabulary-parallel over the mesh's group (:func:`fdiv_kernels.loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # the [hf] extra
    from ..extras import extra_error
    raise extra_error("fdiv_kernels.integrations.transformers", "hf", exc) from exc

from .. import hf
from ..api import loss_from_spec
from ..specs import DPOSpec, FDivSpec, HeadSpec, LossSpec, PrimalSpec

__all__ = ["FDivCausalLMOutput", "PatchConfig", "TokenHeadStats", "apply", "unapply", "patched", "is_patched",
           "patch_config", "token_head_metrics", "token_head_stats"]

_ATTR = "_fdiv_patch"
_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "ref_logp", "return_dict",
                     "return_token_metrics", "return_token_accuracy")


@dataclasses.dataclass
class FDivCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` (``logits`` is ``None``) plus the fused per-token statistics.

    ``token_logp``, ``token_lse``, ``loss_mask``: ``[B, T-1]`` (``[B, T]`` with ``shift_labels``),
    log-prob of each next-token label, log-sum-exp of its logits (the value V(s)), supervised
    positions. ``reward``: implicit reward (per token, or ``[B]`` at sequence level; a DPO patch:
    ``beta * (s - s_ref)`` per row, chosen rows then rejected). ``value_s0``: ``[B]`` lse at each
    row's first supervised position. With ``return_token_metrics=True`` (what TRL's DPOTrainer
    logs): ``token_entropy``, ``token_mean_logit`` (mean logit over the vocabulary) and
    ``token_is_top1`` (the label is the argmax), all ``[B, T-1]`` and detached, from one extra
    no-grad pass over the head (:func:`token_head_stats`; a DPO patch also fills ``token_logp``
    from it). With ``return_token_accuracy=True`` (an f-divergence patch): ``token_is_top1`` from
    the loss's own pass (``fk.loss(return_token_accuracy=True)``: no extra GEMM when training).
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
    """Options of a patched model (see :func:`apply`).

    ``loss``: the validated loss spec (:class:`~fdiv_kernels.specs.FDivSpec`,
    :class:`~fdiv_kernels.specs.PrimalSpec` or :class:`~fdiv_kernels.specs.DPOSpec`), with
    ``reduction="mean"`` (the patch sums over ``num_items_in_batch`` itself); ``head``: the
    :class:`~fdiv_kernels.specs.HeadSpec` with the model's logit scale and soft-cap folded in
    (:func:`fdiv_kernels.hf.head_spec`).
    """

    loss: LossSpec = FDivSpec()
    head: HeadSpec = HeadSpec()
    ignore_index: int = -100

    def __post_init__(self):
        if not isinstance(self.loss, (FDivSpec, PrimalSpec, DPOSpec)):
            raise TypeError(f"loss must be an FDivSpec, PrimalSpec or DPOSpec, got {type(self.loss).__name__}")
        if getattr(self.loss, "reduction", "mean") != "mean":
            raise ValueError(f"the patch picks the reduction itself (a mean, or a sum over num_items_in_batch); "
                             f"give a spec with reduction='mean', got {self.loss.reduction!r}")
        if not isinstance(self.head, HeadSpec):
            raise TypeError(f"head must be a HeadSpec, got {type(self.head).__name__}")

    @property
    def sums_over_num_items(self) -> bool:
        """Whether a ``num_items_in_batch`` kwarg makes the loss ``sum / num_items_in_batch`` (HF's
        gradient-accumulation convention). True for mean-aggregated divergences (sft, reverse_kl,
        pearson, neyman, js) without ``values="free"``, and every primal loss; otherwise (kl,
        squared_hellinger: log-mean-exp; a DPO loss: a mean over pairs) the loss stays a per-call mean."""
        if isinstance(self.loss, PrimalSpec):
            return True
        if isinstance(self.loss, DPOSpec):
            return False
        return self.loss.divergence.aggregate == "mean" and self.loss.values != "free"


@dataclasses.dataclass
class _PatchState:
    config: PatchConfig
    original_forward: Any
    had_instance_forward: bool
    param_names: Tuple[str, ...]


# the options of fk.loss that apply() takes as keywords (FDivSpec's fields, less what the patch decides per call)
_LOSS_OPTIONS = tuple(f.name for f in dataclasses.fields(FDivSpec) if f.name != "reduction")


def _spec_from(spec: Optional[LossSpec], options: Dict[str, Any]) -> LossSpec:
    if spec is not None:
        if options:
            raise ValueError(f"pass the loss either as a spec or as options, not both (got {sorted(options)})")
        return spec
    unknown = sorted(set(options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"apply() got unknown loss option(s) {unknown}; the options are {', '.join(_LOSS_OPTIONS)} "
                        f"(a primal loss: spec=fk.PrimalSpec(...); DPO: spec=fk.DPOSpec(...))")
    return FDivSpec(**options)


# --------------------------------------------------------------------------------------------
# apply / unapply / patched
# --------------------------------------------------------------------------------------------

def apply(model, spec: Optional[LossSpec] = None, *, softcap: Optional[float] = None, temperature: float = 1.0,
          backend: str = "auto", ignore_index: int = -100, **options):
    """Patch ``model`` (in place; also returned) so that calls with ``labels`` compute the fused loss.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``; Llama, Mistral, Qwen2, Gemma, ...).
        spec: the loss as a spec (:class:`~fdiv_kernels.specs.FDivSpec`,
            :class:`~fdiv_kernels.specs.PrimalSpec`, or :class:`~fdiv_kernels.specs.DPOSpec`: then
            ``labels`` is ``[2B, T]``, chosen rows then rejected, and ``ref_logp`` the ``[2B]``
            reference sequence log-probs in the spec's normalisation), or
        **options: the options of :func:`fdiv_kernels.loss` (``divergence="sft"`` by default: HF's
            own cross-entropy loss; ``beta``, ``level``, ``values``, ``z_loss``, ``length_normalize``),
            validated into an :class:`~fdiv_kernels.specs.FDivSpec`.
        softcap: logit soft-cap; ``None`` takes ``config.final_logit_softcapping`` (Gemma 2/3).
        temperature: divides the logits, on top of any scale the config sets
            (:func:`fdiv_kernels.hf.head_spec`).
        backend, ignore_index: as in :func:`fdiv_kernels.loss`.

    Patching twice replaces the options. Raises ``TypeError`` naming the class when the model has
    no usable LM head or body.
    """
    loss_spec = _spec_from(spec, options)
    hf.head_of(model)
    hf.body_of(model)
    config = PatchConfig(loss=loss_spec, head=hf.head_spec(model, softcap=softcap, temperature=temperature,
                                                           backend=backend), ignore_index=int(ignore_index))
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
    hf.register_external(model, hf.head_of(model))
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
def patched(model, spec: Optional[LossSpec] = None, **options):
    """``with patched(model, divergence="js", beta=0.1): ...`` applies the patch for the block only.

    A model that was already patched gets its previous options back on exit.
    """
    previous = getattr(model, _ATTR, None)
    old_config = previous.config if previous is not None else None
    apply(model, spec, **options)
    try:
        yield model
    finally:
        if previous is None:
            unapply(model)
        else:
            previous.config = old_config


# --------------------------------------------------------------------------------------------
# Token metrics (TRL's logits/*, mean_token_accuracy, entropy) without [N, V] logits
# --------------------------------------------------------------------------------------------

class TokenHeadStats(NamedTuple):
    """Per token (``labels``' shape), detached: the mean logit over the vocabulary, whether the
    label is the argmax, the label's log-prob and the entropy of the softmax; 0 / False where
    ``labels == ignore_index``."""

    mean_logit: torch.Tensor
    is_top1: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def token_head_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None, temperature: float = 1.0,
                     ignore_index: int = -100, vocab_chunk: int = 8192, row_chunk: int = 1024) -> TokenHeadStats:
    """:class:`TokenHeadStats` of ``z = cap(hidden W^T + b) / temperature`` (as in
    :func:`fdiv_kernels.loss`), formed in ``[row_chunk, vocab_chunk]`` tiles of the supervised rows
    only: one extra no-grad pass over the head, never the ``[N, V]`` logits. The argmax breaks ties
    to the lowest index (as ``torch.argmax``); the log-sum-exp and the entropy
    ``lse - sum_v p_v z_v`` are accumulated with a running max (fp32; fp64 for fp64 inputs).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    dev = h.device
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mean = torch.zeros(y.shape, dtype=cdt, device=dev)
    top1 = torch.zeros(y.shape, dtype=torch.bool, device=dev)
    logp = torch.zeros(y.shape, dtype=cdt, device=dev)
    ent = torch.zeros(y.shape, dtype=cdt, device=dev)
    rows = (y != ignore_index).nonzero().squeeze(1)
    v = weight.shape[0]
    for r0 in range(0, rows.numel(), row_chunk):
        idx = rows[r0: r0 + row_chunk]
        hr, yr = h[idx], y[idx]
        n = idx.numel()
        best = torch.full((n,), -math.inf, dtype=cdt, device=dev)
        arg = torch.zeros(n, dtype=torch.long, device=dev)
        total = torch.zeros(n, dtype=cdt, device=dev)
        sum_e = torch.zeros(n, dtype=cdt, device=dev)   # sum exp(z - best)
        sum_ez = torch.zeros(n, dtype=cdt, device=dev)  # sum exp(z - best) * z
        z_y = torch.zeros(n, dtype=cdt, device=dev)
        for v0 in range(0, v, vocab_chunk):
            z = (hr @ weight[v0: v0 + vocab_chunk].T).to(cdt)
            if bias is not None:
                z = z + bias[v0: v0 + vocab_chunk].to(cdt)
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature
            total += z.sum(-1)
            m, a = z.max(-1)
            new_best = torch.maximum(best, m)
            rescale = torch.exp(best - new_best)
            e = torch.exp(z - new_best[:, None])
            sum_e = sum_e * rescale + e.sum(-1)
            sum_ez = sum_ez * rescale + (e * z).sum(-1)
            better = m > best  # strict: an earlier chunk keeps a tie, as argmax does
            arg = torch.where(better, a + v0, arg)
            best = new_best
            here = (yr >= v0) & (yr < v0 + z.shape[1])
            z_y = torch.where(here, z.gather(1, (yr - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), z_y)
        lse = best + torch.log(sum_e)
        mean[idx] = total / v
        top1[idx] = arg == yr
        logp[idx] = z_y - lse
        ent[idx] = lse - sum_ez / sum_e
    shape = labels.shape
    return TokenHeadStats(mean.view(shape), top1.view(shape), logp.view(shape), ent.view(shape))


def token_head_metrics(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None, temperature: float = 1.0,
                       ignore_index: int = -100, vocab_chunk: int = 8192,
                       row_chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean_logit, is_top1)`` of :func:`token_head_stats` (``[...]`` fp32 (fp64 for fp64 inputs) / bool)."""
    st = token_head_stats(hidden, weight, labels, bias=bias, softcap=softcap, temperature=temperature,
                          ignore_index=ignore_index, vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    return st.mean_logit, st.is_top1


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
    body_out = hf.body_of(model)(**body_kwargs)
    hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]

    weight, bias = hf.loss_head(model)  # FSDP2 DTensors gathered (differentiably); a ColwiseParallel head stays sharded
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
    head = cfg.head
    with hf.gathered(weight, bias):
        if hidden.dtype != weight.dtype:  # e.g. fp32 norm output with a bf16 head under autocast
            hidden = hidden.to(weight.dtype)
        if isinstance(cfg.loss, DPOSpec):
            fields = _dpo_forward(cfg, hidden, weight, bias, labels, ref_logp)
        else:
            fields = _fdiv_forward(cfg, hidden, weight, bias, labels, ref_logp, num_items,
                                   bool(call.get("return_token_accuracy")))
        if call.get("return_token_metrics"):
            if hf.vocab_parallel(model, weight):
                raise ValueError("return_token_metrics=True is not supported with a vocabulary-parallel (ColwiseParallel) "
                                 "LM head yet: the metrics pass reads the whole head")
            st = token_head_stats(hidden, weight, labels, bias=bias, softcap=head.softcap,
                                  temperature=head.temperature, ignore_index=cfg.ignore_index)
            fields.update(token_entropy=st.entropy, token_mean_logit=st.mean_logit, token_is_top1=st.is_top1)
            if fields.get("token_logp") is None:
                fields["token_logp"] = st.logp
    extras = {f.name: getattr(body_out, f.name) for f in dataclasses.fields(FDivCausalLMOutput)
              if f.name not in _OWN_FIELDS and hasattr(body_out, f.name)}
    result = FDivCausalLMOutput(logits=None, **fields, **extras)
    return result if return_dict else result.to_tuple()


def _fdiv_forward(cfg: PatchConfig, hidden, weight, bias, labels, ref_logp, num_items,
                  return_token_accuracy: bool = False) -> Dict[str, Any]:
    as_sum = num_items is not None and cfg.sums_over_num_items
    spec = dataclasses.replace(cfg.loss, reduction="sum") if as_sum else cfg.loss
    out = loss_from_spec(spec, hidden, weight, labels, ref_logp=ref_logp, bias=bias, head=cfg.head,
                         ignore_index=cfg.ignore_index, return_token_accuracy=return_token_accuracy)
    loss = out.loss
    if as_sum:
        loss = loss / torch.as_tensor(num_items, device=loss.device).to(loss.dtype)
    top1 = None if out.predicted_tokens is None else (out.predicted_tokens == labels) & out.mask
    return dict(loss=loss, token_logp=out.logp, token_lse=out.lse, reward=out.reward, value_s0=out.value_s0,
                loss_mask=out.mask, token_is_top1=top1)


def _dpo_forward(cfg: PatchConfig, hidden, weight, bias, labels, ref_logp) -> Dict[str, Any]:
    """A DPO patch: ``labels [2B, T]`` (chosen rows then rejected), ``ref_logp [2B]``."""
    loss_fn = hf.dpo_loss_module(cfg.loss, cfg.head, ignore_index=cfg.ignore_index)
    out = loss_fn(hidden, weight, labels, bias=bias, ref_logp=ref_logp, return_output=True)
    return dict(loss=out.loss, reward=torch.cat([out.chosen_rewards, out.rejected_rewards]),
                loss_mask=labels != cfg.ignore_index)
