"""Models: the tiny default Llama, local Hugging Face loading, and the hidden-state / LM-head helpers
that let the trainer call the fused loss without ever forming ``[B, T, V]`` logits.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Dict, List, Optional, Tuple

import torch

from .config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_tiny_model(cfg: ModelConfig, tok) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` from ``cfg.tiny`` sized for ``tok`` (random init, seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    if t.hidden_size % t.num_heads:
        raise ValueError(f"model.tiny.hidden_size {t.hidden_size} must be divisible by num_heads {t.num_heads}")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-5, attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    return model.to(torch_dtype(cfg.dtype))


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local directory; right padding; a pad token (eos) if it has none."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (no hub access: give a local path)")
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer is required (offset mapping for prompt masking)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    tok.padding_side = "right"
    return tok


def load_model(path: str, *, dtype: str = "float32") -> torch.nn.Module:
    """``AutoModelForCausalLM`` from a local directory."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (no hub access: give a local path)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (embeddings, blocks, final norm) without the LM head."""
    m = unwrap(model)
    if hasattr(m, "get_decoder"):
        dec = m.get_decoder()
        if dec is not None and dec is not m:
            return dec
    if hasattr(m, "model"):
        return m.model
    raise ValueError(f"cannot find the decoder body of {type(m).__name__}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed / :class:`BodyWithHead` wrappers."""
    while True:
        if isinstance(model, BodyWithHead):
            model = model.lm
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


_HEAD_OVERRIDE = "_fdiv_full_head"


def lm_head(model: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
    """``(weight [V, H], bias [V] | None, softcap | None)`` of the output layer.

    Inside :func:`head_override` (an engine gathering a sharded head, FSDP2) the gathered
    full tensors are returned instead of the module's own parameters.
    """
    m = unwrap(model)
    head = m.get_output_embeddings()
    cap = getattr(m.config, "final_logit_softcapping", None)
    override = m.__dict__.get(_HEAD_OVERRIDE)
    if override is not None:
        return override[0], override[1], cap
    return head.weight, getattr(head, "bias", None), cap


@contextlib.contextmanager
def head_override(model: torch.nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Make :func:`lm_head` return ``(weight, bias)`` for ``model`` inside the block."""
    m = unwrap(model)
    m.__dict__[_HEAD_OVERRIDE] = (weight, bias)
    try:
        yield
    finally:
        m.__dict__.pop(_HEAD_OVERRIDE, None)


class BodyWithHead(torch.nn.Module):
    """Wrapper whose ``forward`` returns the last hidden states ``[B, T, H]`` (no logits).

    Wrapping this (not the causal LM) in DDP / DeepSpeed keeps their forward hooks on the
    body while the trainer applies the fused loss with the LM-head weight.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the body (a wrapped :class:`BodyWithHead` or a causal LM)."""
    if isinstance(model, BodyWithHead) or isinstance(getattr(model, "module", None), BodyWithHead):
        return model(input_ids, attention_mask)
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


def tensor_aliases(model: torch.nn.Module, *, buffers: bool = True) -> List[Tuple[List[str], torch.Tensor]]:
    """``[(names, tensor)]`` of the causal LM's parameters (and buffers), tied ones grouped.

    A tied input/output embedding is one entry with two names, so a state dict or a checkpoint
    can be checked, and a model rebuilt, with the tie intact.
    """
    m = unwrap(model)
    groups: Dict[int, Tuple[List[str], torch.Tensor]] = {}
    items = list(m.named_parameters(remove_duplicate=False))
    if buffers:
        items += list(m.named_buffers(remove_duplicate=False))
    for name, t in items:
        groups.setdefault(id(t), ([], t))[0].append(name)
    return list(groups.values())


def persistent(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` (a parameter or buffer path of the causal LM) is part of its state dict."""
    mod_path, _, leaf = name.rpartition(".")
    mod = unwrap(model).get_submodule(mod_path)
    return leaf in mod._parameters or leaf not in mod._non_persistent_buffers_set


def rebuild_plain(model: torch.nn.Module, full: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh, plain instance of the causal LM inside ``model`` holding the tensors ``full``.

    ``full`` maps one name of every parameter and buffer group (:func:`tensor_aliases`) to its
    full (unsharded) value. The instance is built on the meta device (no initialisation cost)
    and every tensor is assigned, ties included: what a phase trained under ZeRO-3 or FSDP2
    hands to the next phase, free of the engine's partitioned parameters and hooks.
    """
    m = unwrap(model)
    with torch.device("meta"):
        fresh = type(m)(m.config)
    fresh.generation_config = copy.deepcopy(getattr(m, "generation_config", None))
    for names, t in tensor_aliases(m):
        value = next((full[n] for n in names if n in full), None)
        if value is None:
            raise RuntimeError(f"rebuild_plain: no value for {names[0]}")
        is_param = isinstance(t, torch.nn.Parameter)
        new = torch.nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
        for name in names:
            mod_path, _, leaf = name.rpartition(".")
            mod = fresh.get_submodule(mod_path)
            if is_param:
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new
    left = [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"rebuild_plain: {type(m).__name__} has tensors the source model lacks: {left[:5]}")
    flag = "is_activation_checkpointing" if hasattr(type(m), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(m, flag, False):
        fresh.gradient_checkpointing_enable()
    fresh.train(m.training)
    return fresh
