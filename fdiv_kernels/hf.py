"""Hugging Face model plumbing shared by the trainer, the analysis tools and the integrations.

A fused loss reads a causal LM's LM-head weight and never calls the head module, so it needs to
know what the model's own forward does around ``lm_head(hidden)``. This module is the one place
that knows it (``docs/integrations.md``, "What the patch reads from the model")::

    from fdiv_kernels import hf
    h = hf.hidden_states(model, input_ids, attention_mask)      # [B, T, H], the body only
    weight, bias = hf.head_of(model)                            # [V, H], [V] | None
    head = hf.head_spec(model, backend="auto")                  # soft-cap / temperature of the config
    fk.token_stats(h, weight, labels, bias=bias, softcap=head.softcap, temperature=head.temperature)

* :func:`head_of`, :func:`body_of`, :func:`hidden_states`, :class:`BodyWithHead`: the head's
  tensors (validated: no adapter, float, ``[V, H]``), the body, its last hidden states;
* :func:`logit_transform`, :func:`head_spec`: the logit scale and soft-cap the model's forward
  applies (Gemma ``final_logit_softcapping``, Cohere ``logit_scale``, Granite / MiniCPM3 /
  HyperCLOVAX ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``, MuseSpark
  ``output_multiplier``) as the fused head's ``softcap`` / ``temperature``;
* gathering a sharded head: DeepSpeed ZeRO-3 (:func:`gathered`, :func:`register_external`,
  :func:`is_zero3_param`, :func:`full_shape`), FSDP2 (:func:`full_tensor` per call,
  differentiably), and :func:`gathered_head` for a training loop that gathers once per optimizer
  step (tied weights gathered once); a head split along the vocabulary by tensor parallelism
  (``ColwiseParallel``) is never gathered (:func:`loss_head`, :func:`vocab_parallel`);
* :func:`head_inputs`: all of the above for one batch; :func:`dpo_loss_module`: the fused DPO
  module of a :class:`~fdiv_kernels.specs.DPOSpec` and a head;
* :func:`load_model`, :func:`load_tokenizer`, :func:`torch_dtype`: loading from local directories
  or Hugging Face Hub ids;
  :func:`default_deepspeed_accelerator` keeps DeepSpeed's import quiet on CPU machines.

Only ``torch`` is imported here; ``transformers`` and ``deepspeed`` are imported when a function
needs them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, NamedTuple, Optional, Tuple

import torch

from . import checks
from .errors import ConfigError
from .nn import FusedLinearDPOLoss
from .specs import DPOSpec, HeadSpec

__all__ = ["BodyWithHead", "DTYPES", "HeadInputs", "LOGIT_SCALES", "body_of", "check_model", "check_model_dir",
           "default_deepspeed_accelerator", "dpo_loss_module", "full_shape", "full_tensor", "gathered", "gathered_head", "head_inputs", "head_of",
           "head_spec", "hidden_states", "hub_id", "is_zero3_param", "load_model", "load_tokenizer", "logit_transform",
           "loss_head", "register_external", "torch_dtype", "unwrap", "use_head", "vocab_parallel"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}


def default_deepspeed_accelerator() -> None:
    """``DS_ACCELERATOR=cpu`` when there is no CUDA device (unless set): transformers imports
    DeepSpeed when it is installed, whose accelerator probe otherwise prints a warning to stdout."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def torch_dtype(name: str) -> torch.dtype:
    """``torch.float32`` etc. for ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------
# Loading (local directories only: there is no hub access in the tests and the demo)
# --------------------------------------------------------------------------------------------

def load_model(path: str, *, dtype: str = "float32") -> torch.nn.Module:
    """``AutoModelForCausalLM`` in ``dtype`` from a local directory or a Hugging Face Hub id
    (``meta-llama/Meta-Llama-3-8B``: transformers downloads and caches it; ``HF_TOKEN``,
    ``HF_HUB_OFFLINE`` apply). A name that is neither raises ``OSError``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local directory or a Hugging Face Hub id (as :func:`load_model`):
    fast (offsets), with a chat template, right padding, and a pad token (eos) if it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer is required (offset mapping for prompt masking)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    tok.padding_side = "right"
    return tok


def hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face Hub id (``org/name`` or ``name``) rather than a
    local path (``/x``, ``./x``, ``~/x``, ``a/b/c``)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers and datasets
        return False
    except ValueError:  # HFValidationError
        return False
    return True


def check_model_dir(path: str, what: str) -> None:
    """A local Hugging Face model directory: ``config.json`` readable by ``AutoConfig`` and weights."""
    if not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is not a directory (give a local model directory or a "
                          "Hugging Face Hub id such as meta-llama/Meta-Llama-3-8B)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{what} {path!r} has no config.json")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{what} {path!r}: config.json cannot be read ({' '.join(str(err).split())[:200]})") from None
    weights = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")]
    if not weights:
        raise ConfigError(f"{what} {path!r} holds no weights (*.safetensors or *.bin)")


def check_model(name: str, what: str) -> None:
    """A local model directory (:func:`check_model_dir`) or a Hugging Face Hub id whose config
    ``transformers`` resolves (downloading it, or from its cache; ``HF_HUB_OFFLINE``, ``HF_TOKEN``
    apply): what ``AutoModelForCausalLM.from_pretrained`` will load."""
    if os.path.isdir(name) or not hub_id(name):
        check_model_dir(name, what)
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        text = " ".join(str(err).split())
        if "couldn't connect" in text.lower() or "offline" in text.lower():
            why = ("the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE=1) and it is not in the "
                   "local cache; run where the hub is reachable (HF_HUB_OFFLINE unset) to download it")
        elif "gated" in text.lower() or "401" in text or "403" in text:
            why = "a gated or private model: accept its licence on the Hub and log in (hf auth login, or HF_TOKEN)"
        elif "not a valid model identifier" in text or "404" in text:
            why = "no such model on the Hugging Face Hub (or a private one: log in with hf auth login or HF_TOKEN)"
        else:
            why = text[:200]
        raise ConfigError(f"{what} {name!r} is not a local directory, and as a Hugging Face Hub id: {why}; "
                          "or give a local model directory") from None


# --------------------------------------------------------------------------------------------
# Head and body
# --------------------------------------------------------------------------------------------

class BodyWithHead(torch.nn.Module):
    """Wrapper whose ``forward(input_ids, attention_mask)`` returns the last hidden states
    ``[B, T, H]`` of the causal LM ``lm`` (no logits).

    Wrapping this (not the causal LM) in DDP / DeepSpeed / FSDP2 keeps their hooks on the body
    while the loss is computed from the hidden states and the LM-head weight.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return body_of(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / DeepSpeed (``.module``) and :class:`BodyWithHead` wrappers."""
    while True:
        if isinstance(model, BodyWithHead):
            model = model.lm
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


_HEAD_OVERRIDE = "_fdiv_full_head"


def head_of(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] | None)`` of the LM head found with ``get_output_embeddings()``.

    Inside :func:`use_head` / :func:`gathered_head` the full (gathered) tensors set there. Raises
    ``TypeError`` naming the class when there is no head, or one the fused head cannot read
    exactly: wrapped by an adapter, quantized, not ``[V, H]``, or with parameters besides
    ``weight`` and ``bias`` (e.g. a per-token logit scale).
    """
    m = unwrap(model)
    override = m.__dict__.get(_HEAD_OVERRIDE)
    if override is not None:
        return override
    cls = type(m).__name__
    getter = getattr(m, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise TypeError(f"{cls}: get_output_embeddings() found no LM head (is this a *ForCausalLM model?)")
    if any(hasattr(head, a) for a in ("lora_A", "base_layer", "modules_to_save")):
        raise TypeError(f"{cls}: its LM head is wrapped by an adapter ({type(head).__name__}); the fused head reads "
                        f"the plain weight and would ignore the adapter. Keep the LM head out of the adapter's "
                        f"target modules")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{cls}: its LM head {type(head).__name__} has no weight tensor")
    if not weight.is_floating_point():
        raise TypeError(f"{cls}: its LM head weight has dtype {weight.dtype} (quantized heads are not supported; "
                        f"keep the head in float/bf16, e.g. skip it in the quantization config)")
    shape = full_shape(weight)
    if len(shape) != 2:
        raise TypeError(f"{cls}: LM head weight has shape {tuple(shape)}, expected [V, H]")
    bias = getattr(head, "bias", None)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(full_shape(bias)) != (shape[0],):
            raise TypeError(f"{cls}: unsupported LM head bias {type(bias).__name__} "
                            f"{tuple(getattr(bias, 'shape', ()))} (expected a float tensor of shape [{shape[0]}])")
    extra = [n for n, _ in head.named_parameters() if n not in ("weight", "bias")]
    if extra:
        raise TypeError(f"{cls}: its LM head {type(head).__name__} has parameters besides weight and bias "
                        f"({', '.join(extra[:3])}); the fused head computes hidden @ weight.T + bias only")
    return weight, bias


@contextlib.contextmanager
def use_head(model, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Make :func:`head_of` return ``(weight, bias)`` for ``model`` inside the block (e.g. full
    tensors gathered from a sharded head)."""
    m = unwrap(model)
    m.__dict__[_HEAD_OVERRIDE] = (weight, bias)
    try:
        yield
    finally:
        m.__dict__.pop(_HEAD_OVERRIDE, None)


def body_of(model) -> torch.nn.Module:
    """The module that returns ``last_hidden_state``: ``model.base_model`` (the module named by
    ``base_model_prefix``), else ``get_decoder()``."""
    m = unwrap(model)
    body = getattr(m, "base_model", m)
    if body is m and callable(getattr(m, "get_decoder", None)):
        body = m.get_decoder()
    if body is m or body is None:
        raise TypeError(f"{type(m).__name__}: no body module found (base_model_prefix="
                        f"{getattr(m, 'base_model_prefix', None)!r}, get_decoder() gave the model itself)")
    return body


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the body: a (wrapped) :class:`BodyWithHead` is called
    as it is (its wrapper's hooks run), a causal LM through :func:`body_of`."""
    if isinstance(model, BodyWithHead) or isinstance(getattr(model, "module", None), BodyWithHead):
        return model(input_ids, attention_mask)
    return body_of(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# --------------------------------------------------------------------------------------------
# The logit transform of the model's forward
# --------------------------------------------------------------------------------------------

#: model_type -> (config attribute, +1: the forward multiplies the logits by it, -1: divides them).
#: The same name means different things (Granite divides by ``logits_scaling``, HyperCLOVAX
#: multiplies), so a scale is applied only for the model types listed (read off transformers
#: 5.24); another model type whose config sets one of these names to a value other than 1 raises.
LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass"), ("logit_scale", 1)),
    "falcon_h1": ("lm_head_multiplier", 1),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                     "granitemoeshared", "granite4_vision", "granite_docling", "minicpm3"), ("logits_scaling", -1)),
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), ("logits_scaling", 1)),
    **dict.fromkeys(("muse_glimmer", "muse_spark"), ("output_multiplier", 1)),
}
#: model types whose forward scales the hidden states before the head (the same as scaling the
#: logits when the head has no bias)
HIDDEN_SCALED = ("minicpm3",)


def _text_config(model):
    cfg = unwrap(model).config
    return cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg


def _scale(model) -> Tuple[float, float]:
    """``(multiplier, divisor)`` of ``lm_head(h)`` in the model's forward (``(1, 1)``: none)."""
    m = unwrap(model)
    cfg, text = m.config, _text_config(m)
    types = [t for t in (getattr(cfg, "model_type", None), getattr(text, "model_type", None)) if t]
    entry = next((LOGIT_SCALES[t] for t in types if t in LOGIT_SCALES), None)
    if entry is None:
        for attr in sorted({a for a, _ in LOGIT_SCALES.values()}):
            v = getattr(text, attr, None)
            if v is not None and float(v) != 1.0:
                raise NotImplementedError(
                    f"{type(m).__name__}: config.{attr}={v} on model type {types[0] if types else '?'!r}, whose logit "
                    f"scale fdiv_kernels does not know (Granite divides the logits by logits_scaling, HyperCLOVAX "
                    f"multiplies them); add the model type to fdiv_kernels.hf.LOGIT_SCALES")
        return 1.0, 1.0
    attr, sign = entry
    v = getattr(text, attr, None)
    if v is None:
        v = getattr(cfg, attr, None)
    v = 1.0 if v is None else float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{type(m).__name__}: unsupported logit scale config.{attr}={v} "
                         f"(expected a finite number > 0)")
    if any(t in HIDDEN_SCALED for t in types) and v != 1.0 and head_of(m)[1] is not None:
        raise NotImplementedError(f"{type(m).__name__}: the forward scales the hidden states by config.{attr} and "
                                  f"the LM head has a bias; the fused head can scale the logits only")
    return (v, 1.0) if sign > 0 else (1.0, v)


def logit_transform(model) -> Tuple[Optional[float], float]:
    """``(softcap, scale)`` of the model's forward, read from its (text) config:
    ``logits = softcap * tanh(scale * lm_head(h) / softcap)`` (``softcap`` None: ``scale * lm_head(h)``).

    ``scale``: Cohere ``logit_scale``, Falcon-H1 ``lm_head_multiplier``, MuseSpark
    ``output_multiplier``, HyperCLOVAX ``logits_scaling``, ``1 / logits_scaling`` for Granite and
    MiniCPM3 (:data:`LOGIT_SCALES`); ``softcap``: ``final_logit_softcapping`` (Gemma 2/3).
    """
    mult, div = _scale(model)
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return (float(cap) if cap is not None else None), mult / div


def head_spec(model, *, softcap: Optional[float] = None, temperature: float = 1.0,
              backend: str = "auto") -> HeadSpec:
    """The :class:`~fdiv_kernels.specs.HeadSpec` whose logits ``cap(h W^T + b) / temperature``
    equal the model's own (:func:`logit_transform`) divided by ``temperature``.

    ``cap_c(s x) = s cap_{c/s}(x)``, so a scale ``s`` and a soft-cap ``c`` become
    ``HeadSpec(softcap=c / s, temperature=temperature / s)``. ``softcap`` replaces the config's
    soft-cap (it caps the scaled logits, where the config's would).
    """
    mult, div = _scale(model)
    cap = softcap if softcap is not None else logit_transform(model)[0]
    return HeadSpec(None if cap is None else cap * div / mult, temperature * div / mult, backend)


def dpo_loss_module(spec: DPOSpec, head: HeadSpec = HeadSpec(), *, ignore_index: int = -100):
    """The :class:`fdiv_kernels.nn.FusedLinearDPOLoss` holding a DPO spec and a head spec (for the
    trainer, the alignment metric and the transformers patch)."""
    return FusedLinearDPOLoss(spec, head, ignore_index=ignore_index)


class HeadInputs(NamedTuple):
    """What a fused loss takes from a model: ``hidden [B, T, H]``, ``weight [V, H]`` and ``bias``
    in the hidden states' dtype, and the :class:`~fdiv_kernels.specs.HeadSpec`."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    head: HeadSpec


def head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                backend: str = "auto") -> HeadInputs:
    """Run the body and collect the head (:func:`hidden_states`, :func:`head_of`, :func:`head_spec`).

    Position ``t`` of ``hidden`` predicts token ``t + 1`` (shift the labels, or the hidden states,
    yourself). The head is cast to the hidden states' dtype (FSDP2 mixed precision: a gathered
    fp32 head, a bf16 body).
    """
    h = hidden_states(model, input_ids, attention_mask)
    w, b = head_of(model)
    if w.dtype != h.dtype:
        w, b = w.to(h.dtype), (b.to(h.dtype) if b is not None else None)
    return HeadInputs(h, w, b, head_spec(model, backend=backend))


# --------------------------------------------------------------------------------------------
# Sharded heads: DeepSpeed ZeRO-3 and FSDP2
# --------------------------------------------------------------------------------------------

def is_zero3_param(p: Optional[torch.Tensor]) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (it carries ``ds_id``)."""
    return p is not None and hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The logical shape of ``p`` (``ds_shape`` for a partitioned ZeRO-3 parameter)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def _needs_gather(p: torch.Tensor) -> bool:
    status = getattr(p, "ds_status", None)
    return getattr(status, "name", str(status)) != "AVAILABLE"


def gathered(*params: Optional[torch.Tensor]):
    """Context manager gathering the ZeRO-3 partitioned ``params`` (``None`` entries ignored)
    with ``deepspeed.zero.GatheredParameters``.

    A null context when no parameter is ZeRO-3 managed or all are already gathered (e.g. a head
    tied to the input embedding, gathered by the embedding's own hook). Duplicates (tied
    weights) are gathered once. ``deepspeed`` is imported only when there is something to gather.
    """
    todo = {id(p): p for p in params if is_zero3_param(p) and _needs_gather(p)}
    if not todo:
        return contextlib.nullcontext()
    import deepspeed  # lazy: only reached with ZeRO-3 parameters

    return deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None)


def register_external(module: torch.nn.Module, params: Iterable[Optional[torch.Tensor]]) -> int:
    """Register the ZeRO-3 ``params`` as external parameters of ``module``
    (``deepspeed.zero.register_external_parameter``), each once, so that a forward/backward of
    ``module`` gathers them and reduce-scatters their gradients. Returns the number of distinct
    parameters registered (0 when none is ZeRO-3 managed; ``deepspeed`` is then not imported)."""
    todo = {id(p): p for p in params if is_zero3_param(p)}
    if not todo:
        return 0
    import deepspeed

    for p in todo.values():
        deepspeed.zero.register_external_parameter(module, p)
    return len(todo)


def full_tensor(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The full value of an FSDP2 (DTensor) parameter, differentiably; other tensors as they are.

    Its gradient is a per-rank partial sum, averaged over ranks on the way back (one
    reduce-scatter), as FSDP2 averages every other gradient: ``full_tensor()``'s default would
    treat it as replicated and keep each rank's own slice unreduced.
    """
    if t is None or not hasattr(t, "full_tensor"):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def vocab_parallel(model, weight: torch.Tensor) -> bool:
    """Whether the LM-head ``weight`` of ``model`` is split along the vocabulary by tensor
    parallelism: a ``DTensor`` placed ``Shard(0)`` on a one-dimensional mesh (what
    ``parallelize_module(..., {"lm_head": ColwiseParallel()})`` makes) that FSDP2 does not manage
    (neither the model nor its head is an ``FSDPModule``: FSDP2 shards a parameter the same way, for
    data parallelism, and it is gathered instead, :func:`full_tensor`)."""
    if not checks.is_dtensor(weight):
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return False
    m = unwrap(model)
    head = m.get_output_embeddings() if callable(getattr(m, "get_output_embeddings", None)) else None
    return not any(isinstance(x, FSDPModule) for x in (m, head))


def loss_head(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of :func:`head_of` as a fused loss takes them: an FSDP2 (DTensor) head
    gathered differentiably (:func:`full_tensor`), a vocabulary-parallel one (:func:`vocab_parallel`)
    as it is (the loss keeps it sharded), anything else as it is."""
    weight, bias = head_of(model)
    if vocab_parallel(model, weight):
        return weight, bias
    return full_tensor(weight), full_tensor(bias)


@contextlib.contextmanager
def gathered_head(model):
    """Inside the block :func:`head_of` gives the full LM-head weight and bias of ``model``, gathered
    once for every forward/backward the block runs (a training loop enters it once per optimizer
    step, around all its micro-batches):

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` (:func:`gathered`; a head tied to the input
      embedding once); the gradients are still reduce-scattered per backward by ZeRO-3's hooks;
    * FSDP2 (a DTensor head): one ``full_tensor()`` all-gather into a detached full tensor; the
      gradient accumulated on it inside the block is averaged over ranks into the sharded
      parameter's ``.grad`` (one reduce-scatter) on exit;
    * anything else: nothing to do.
    """
    head = unwrap(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if is_zero3_param(weight) or is_zero3_param(bias):
        with gathered(weight, bias):
            yield
        return
    if not hasattr(weight, "full_tensor"):
        yield
        return
    grad = torch.is_grad_enabled()
    full_w = weight.full_tensor().detach().requires_grad_(grad and weight.requires_grad)
    full_b = None
    if hasattr(bias, "full_tensor"):
        full_b = bias.full_tensor().detach().requires_grad_(grad and bias.requires_grad)
    with use_head(model, full_w, full_b):
        yield
    for shard, full in ((weight, full_w), (bias, full_b)):
        if full is not None and full.grad is not None:
            _reduce_into(shard, full.grad)


def _reduce_into(shard, full_grad: torch.Tensor) -> None:
    """Average ``full_grad`` over ranks into ``shard``'s sharded gradient (one reduce-scatter),
    as FSDP2 does for every other parameter."""
    from torch.distributed.tensor import DTensor, Partial

    g = DTensor.from_local(full_grad.to(shard.dtype), shard.device_mesh, [Partial("avg")], run_check=False)
    g = g.redistribute(shard.device_mesh, shard.placements)
    if shard.grad is None:
        shard.grad = g
    else:
        shard.grad += g
