"""Models: the tiny default Llama, and the trainer's checkpoint helpers (tied-weight groups, a
plain rebuild after a sharded engine).

Loading, the LM head, the body and the hidden states are :mod:`fdiv_kernels.hf` (shared with the
analysis tools and the integrations).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch

from ..hf import torch_dtype, unwrap
from .config import ModelConfig


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
        enable_checkpointing(fresh)
    fresh.train(m.training)
    return fresh


def enable_checkpointing(m: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing of a transformers model: ``activation_checkpointing_enable``
    where transformers has it (its ``gradient_checkpointing_enable`` is then a deprecated alias that
    raises a FutureWarning), else ``gradient_checkpointing_enable``."""
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
