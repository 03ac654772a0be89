"""The fused primitive: per-token log-prob of the label and log-sum-exp of the logits.

:func:`token_stats` is the one operator every loss in the package is built on. Its autograd
function drops ignored rows before any GEMM, calls the chosen backend on the remaining rows,
and scatters the results back; ignored positions get ``logp = lse = entropy = 0`` and no
gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _checks
from . import compiled, torch_chunked
from .backends import resolve_backend


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`token_stats`, each with the shape of ``labels``.

    ``logp``: log-softmax of the logits at the label. ``lse``: log-sum-exp of the logits (the
    state value V(s) of the paper). ``entropy``: entropy of softmax(logits), or ``None`` unless
    requested. float32 (float64 for float64 inputs); 0 at ignored positions.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor] = None


class TokenStatsFunction(torch.autograd.Function):
    """``autograd.Function`` behind :func:`token_stats`, public for custom modules.

    ``TokenStatsFunction.apply(hidden, weight, bias, labels, ignore_index, softcap, temperature,
    return_entropy, backend_name) -> (logp, lse, entropy)``; ``entropy`` is an empty tensor when
    not requested. Inputs must already be validated (see :func:`token_stats`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, temperature, return_entropy, backend_name):
        backend = resolve_backend(backend_name, hidden)
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        valid = y != ignore_index
        idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        hv = h if idx is None else h.index_select(0, idx)
        yv = (y if idx is None else y.index_select(0, idx)).long()
        logp_v, lse_v, ent_v = backend.forward(
            hv.contiguous(), weight.contiguous(), bias, yv,
            softcap=softcap, temperature=temperature, return_entropy=return_entropy)
        out_dtype = lse_v.dtype

        def scatter(v):
            if idx is None:
                return v.reshape(labels.shape)
            full = torch.zeros(y.shape[0], dtype=out_dtype, device=v.device)
            return full.index_copy_(0, idx, v).reshape(labels.shape)

        logp, lse = scatter(logp_v), scatter(lse_v)
        ent = scatter(ent_v) if return_entropy else lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse_v, ent_v if return_entropy else None,
                              idx if idx is not None else None)
        ctx.cfg = (ignore_index, softcap, temperature, return_entropy, backend)
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, lse, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_ent):
        hidden, weight, bias, labels, lse_v, ent_v, idx = ctx.saved_tensors
        _, softcap, temperature, return_entropy, backend = ctx.cfg
        h = hidden.reshape(-1, hidden.shape[-1])
        hv = h if idx is None else h.index_select(0, idx)
        yv = (labels.reshape(-1) if idx is None else labels.reshape(-1).index_select(0, idx)).long()

        def pick(g):
            g = torch.zeros_like(lse_v) if g is None else g.reshape(-1).to(lse_v.dtype)
            return g if idx is None else g.index_select(0, idx)

        g, k = pick(grad_logp), pick(grad_lse)
        e = pick(grad_ent) if (return_entropy and grad_ent is not None) else None
        _checks.check_coefficients("token_stats backward", grad_logp=g, grad_lse=k, grad_entropy=e)
        gh, gw, gb = backend.backward(hv.contiguous(), weight.contiguous(), bias, yv, lse_v, ent_v, g, k, e,
                                      softcap=softcap, temperature=temperature)
        if idx is not None:
            gh = torch.zeros(h.shape, dtype=gh.dtype, device=gh.device).index_copy_(0, idx, gh)
        grad_hidden = gh.reshape(hidden.shape).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = gw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = gb.to(bias.dtype) if (bias is not None and ctx.needs_input_grad[2]) else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                softcap: Optional[float] = None, temperature: float = 1.0,
                return_entropy: bool = False, backend: str = "auto") -> TokenStats:
    """Fused LM head + log-softmax statistics, without storing the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16/float64 hidden states.
        weight: ``[V, H]`` LM-head weight (``nn.Linear(H, V).weight``), same dtype as ``hidden``.
        labels: ``[...]`` int32/int64 targets in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` bias.
        softcap: optional logit soft-cap ``c``: ``z = c * tanh(z / c)`` (Gemma 2).
        temperature: logits are divided by it after the soft-cap.
        return_entropy: also return the per-token entropy of ``softmax(z)``.
        backend: "auto", "torch", or any name in :func:`fdiv_kernels.available_backends`.

    Returns:
        :class:`TokenStats` ``(logp, lse, entropy)`` with the shape of ``labels``, float32
        (float64 for float64 inputs), 0 at ignored positions, where
        ``z = hidden @ weight.T + bias``, ``lse = logsumexp(z)`` and ``logp = z[label] - lse``.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Logits of -inf (a vocabulary masked through ``bias``) add exact zeros to every output and
    gradient. ``ValueError`` (data checks, see :mod:`fdiv_kernels._checks`): a supervised token
    whose logits are all -inf or not finite, or whose label's logit is -inf.
    """
    _checks.check_head(hidden, weight, labels, bias, ignore_index, softcap, temperature)
    if compiled.compiling():
        return TokenStats(*compiled.token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                                softcap=softcap, temperature=temperature,
                                                return_entropy=return_entropy, backend=backend))
    logp, lse, ent = TokenStatsFunction.apply(hidden, weight, bias, labels, ignore_index, softcap,
                                              float(temperature), bool(return_entropy), backend)
    _checks.check_token_stats(logp, lse, ent if return_entropy else None, labels, softcap, temperature)
    return TokenStats(logp, lse, ent if return_entropy else None)


def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                            return_entropy: bool = False) -> TokenStats:
    """:func:`token_stats` for users who already hold ``logits [..., V]``.

    Plain torch autograd in float32 (float64 for float64 logits): the logits are upcast, so
    bf16/fp16 logits of any magnitude give finite results.
    """
    _checks.check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    _checks.check_same_device(logits=logits, labels=labels)
    _checks.check_labels(labels, logits.shape[-1], ignore_index)
    if compiled.compiling():
        labels = compiled.check_labels(labels, logits.shape[-1], ignore_index)
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # ignored rows are replaced by zeros first: whatever they hold (-inf everywhere, NaN) never
    # reaches a value or a gradient
    z = torch.where(valid.unsqueeze(-1), z, zero)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    ent = torch.where(valid, torch_chunked.entropy(z), zero) if return_entropy else None
    out = TokenStats(torch.where(valid, logp, zero), torch.where(valid, lse, zero), ent)
    if compiled.compiling():
        return compiled.checked_stats(out, labels)
    _checks.check_token_stats(out.logp, out.lse, out.entropy, labels)
    return out
