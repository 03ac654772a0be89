"""The fused primitive: per-token log-prob of the label and log-sum-exp of the logits.

:func:`token_stats` is the one operator every loss in the package is built on. Its autograd
function drops ignored rows before any GEMM, calls the chosen backend on the remaining rows,
and scatters the results back; ignored positions get ``logp = lse = entropy = 0`` and no
gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Tuple, Union, overload

import torch

from .. import _checks
from ..specs import HeadSpec
from . import compiled, torch_chunked
from .backends import resolve_backend


class LogpLse(NamedTuple):
    """:func:`token_stats` without entropy: ``logp, lse = fk.token_stats(h, w, y)``.

    ``logp``: log-softmax of the logits at the label. ``lse``: log-sum-exp of the logits (the
    state value V(s) of the paper). Shape of ``labels``, float32 (float64 for float64 inputs), 0 at
    ignored positions. ``.entropy`` reads ``None`` (as the 3-field :class:`TokenStats` did).
    """

    logp: torch.Tensor
    lse: torch.Tensor

    @property
    def entropy(self) -> None:
        return None


class TokenStats(NamedTuple):
    """:func:`token_stats` with ``return_entropy=True``: ``logp, lse, entropy`` (fields as in
    :class:`LogpLse`; ``entropy``: entropy of softmax(logits))."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TokenStatsParams:
    """Everything :class:`TokenStatsFunction` needs besides tensors (as cut-cross-entropy's
    ``CCEParams``), saved on ``ctx``.

    ``head``: soft-cap, temperature and backend name (:class:`~fdiv_kernels.specs.HeadSpec`,
    validated there); ``ignore_index``: label of the positions without a target;
    ``return_entropy``: also compute the per-token entropy.
    """

    head: HeadSpec = HeadSpec()
    ignore_index: int = -100
    return_entropy: bool = False


def valid_grads(idx: Optional[torch.Tensor], lse_v: torch.Tensor, ent_v: Optional[torch.Tensor],
                grad_logp, grad_lse, grad_ent) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The output gradients ``(g, k, e)`` of the supervised tokens ``idx`` (``None``: all), in the
    compute dtype of ``lse_v``; a missing gradient is zero, and ``e`` is ``None`` unless the entropy
    ``ent_v`` was computed and has a gradient (the one entropy-gradient check of every backend)."""

    def pick(gr):
        if gr is None:
            return torch.zeros_like(lse_v)
        gr = gr.reshape(-1).to(lse_v.dtype)
        return gr if idx is None else gr.index_select(0, idx)

    return pick(grad_logp), pick(grad_lse), (pick(grad_ent) if (grad_ent is not None and ent_v is not None) else None)


def valid_rows(hidden: torch.Tensor, labels: torch.Tensor, idx: Optional[torch.Tensor]):
    """``(hidden [n, H], labels [n])`` of the supervised tokens ``idx`` (``None``: all), contiguous,
    labels int64: the layout every backend receives."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if idx is not None:
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    return h.contiguous(), y.long().contiguous()


def _result(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor]) -> Union[LogpLse, TokenStats]:
    return LogpLse(logp, lse) if entropy is None else TokenStats(logp, lse, entropy)


class TokenStatsFunction(torch.autograd.Function):
    """``autograd.Function`` behind :func:`token_stats`, public for custom modules.

    ``TokenStatsFunction.apply(hidden, weight, bias, labels, params) -> (logp, lse, entropy)``
    with a :class:`TokenStatsParams`; ``entropy`` is an empty tensor unless
    ``params.return_entropy``. Inputs must already be validated (see :func:`token_stats`).
    The old form ``apply(hidden, weight, bias, labels, ignore_index, softcap, temperature,
    return_entropy, backend_name)`` still works, with a ``DeprecationWarning``.

    This function does, once for every backend, what the backends' contract
    (:mod:`fdiv_kernels.ops.backends`) leaves out: it picks the backend for the tensors' device
    and dtype (the ``"torch"`` reference for a dtype the backend does not declare), passes only
    the supervised rows, contiguous, with int64 labels, captures the backend's options at
    forward for the backward, and passes an entropy gradient only when the entropy was computed.
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        if len(args) == 9 and not kwargs:
            warnings.warn("TokenStatsFunction.apply(hidden, weight, bias, labels, ignore_index, softcap, temperature, "
                          "return_entropy, backend) is deprecated; pass a TokenStatsParams: "
                          "apply(hidden, weight, bias, labels, params)", DeprecationWarning, stacklevel=2)
            hidden, weight, bias, labels, ignore_index, softcap, temperature, return_entropy, backend = args
            args = (hidden, weight, bias, labels,
                    TokenStatsParams(HeadSpec(softcap, temperature, backend), ignore_index, bool(return_entropy)))
        return super().apply(*args, **kwargs)

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: TokenStatsParams):
        backend = resolve_backend(params.head.backend, hidden)
        options = backend.options() if backend.options is not None else None
        y = labels.reshape(-1)
        valid = y != params.ignore_index
        idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        hv, yv = valid_rows(hidden, labels, idx)
        weight_c = weight.contiguous()
        bias_c = None if bias is None else bias.contiguous()
        logp_v, lse_v, ent_v = backend.forward(
            hv, weight_c, bias_c, yv, softcap=params.head.softcap, temperature=params.head.temperature,
            return_entropy=params.return_entropy, **_options_kw(options))
        out_dtype = lse_v.dtype

        def scatter(v):
            if idx is None:
                return v.reshape(labels.shape)
            full = torch.zeros(y.shape[0], dtype=out_dtype, device=v.device)
            return full.index_copy_(0, idx, v).reshape(labels.shape)

        logp, lse = scatter(logp_v), scatter(lse_v)
        ent = scatter(ent_v) if params.return_entropy else lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse_v, ent_v if params.return_entropy else None, idx)
        ctx.params, ctx.backend, ctx.options = params, backend, options
        if not params.return_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, lse, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_ent):
        hidden, weight, bias, labels, lse_v, ent_v, idx = ctx.saved_tensors
        head = ctx.params.head
        hv, yv = valid_rows(hidden, labels, idx)
        g, k, e = valid_grads(idx, lse_v, ent_v, grad_logp, grad_lse, grad_ent)
        _checks.check_coefficients("token_stats backward", grad_logp=g, grad_lse=k, grad_entropy=e)
        gh, gw, gb = ctx.backend.backward(hv, weight.contiguous(), None if bias is None else bias.contiguous(), yv,
                                          lse_v, ent_v, g, k, e, softcap=head.softcap, temperature=head.temperature,
                                          **_options_kw(ctx.options))
        if idx is not None:
            gh = torch.zeros((labels.numel(), hidden.shape[-1]), dtype=gh.dtype, device=gh.device).index_copy_(0, idx, gh)
        grad_hidden = gh.reshape(hidden.shape).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = gw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = gb.to(bias.dtype) if (bias is not None and ctx.needs_input_grad[2]) else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _options_kw(options) -> dict:
    """``options=`` for a backend that declares options (:attr:`Backend.options`), else nothing."""
    return {} if options is None else {"options": options}


@overload
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = ..., ignore_index: int = ..., softcap: Optional[float] = ...,
                temperature: float = ..., return_entropy: Literal[False] = ..., backend: str = ...) -> LogpLse: ...


@overload
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = ..., ignore_index: int = ..., softcap: Optional[float] = ...,
                temperature: float = ..., return_entropy: Literal[True], backend: str = ...) -> TokenStats: ...


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                softcap: Optional[float] = None, temperature: float = 1.0,
                return_entropy: bool = False, backend: str = "auto") -> Union[LogpLse, TokenStats]:
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
        ``(logp, lse)`` (a :class:`LogpLse`), or with ``return_entropy=True`` a :class:`TokenStats`
        ``(logp, lse, entropy)``; each with the shape of ``labels``, float32
        (float64 for float64 inputs), 0 at ignored positions, where
        ``z = hidden @ weight.T + bias``, ``lse = logsumexp(z)`` and ``logp = z[label] - lse``.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Logits of -inf (a vocabulary masked through ``bias``) add exact zeros to every output and
    gradient. ``ValueError`` (data checks, see :mod:`fdiv_kernels._checks`): a supervised token
    whose logits are all -inf or not finite, or whose label's logit is -inf.
    """
    _checks.check_head(hidden, weight, labels, bias, ignore_index, softcap, temperature)
    if compiled.compiling():
        return _result(*compiled.token_stats(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                             softcap=softcap, temperature=temperature,
                                             return_entropy=return_entropy, backend=backend))
    params = TokenStatsParams(HeadSpec(softcap, temperature, backend), ignore_index, bool(return_entropy))
    logp, lse, ent = TokenStatsFunction.apply(hidden, weight, bias, labels, params)
    _checks.check_token_stats(logp, lse, ent if return_entropy else None, labels, softcap, temperature)
    return _result(logp, lse, ent if return_entropy else None)


@overload
def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                            return_entropy: Literal[False] = ...) -> LogpLse: ...


@overload
def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = ...,
                            return_entropy: Literal[True]) -> TokenStats: ...


def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                            return_entropy: bool = False) -> Union[LogpLse, TokenStats]:
    """:func:`token_stats` for users who already hold ``logits [..., V]`` (same return types).

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
    out = _result(torch.where(valid, logp, zero), torch.where(valid, lse, zero), ent)
    if compiled.compiling():
        return compiled.checked_stats(out, labels)
    _checks.check_token_stats(out.logp, out.lse, out.entropy, labels)
    return out
