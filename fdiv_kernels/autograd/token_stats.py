"""The fused primitive's autograd: per-token log-prob of the label and log-sum-exp of the logits.

:class:`TokenStatsFunction` drops ignored rows before any GEMM, calls the chosen backend
(:mod:`fdiv_kernels.kernels`) on the remaining rows and scatters the results back; ignored
positions get ``logp = lse = entropy = 0`` and no gradient. Its forward and backward are the plain
functions :func:`token_stats_forward` and :func:`token_stats_backward`, which the ``torch.compile``
ops (:mod:`fdiv_kernels.compiled`) call too. Inputs are trusted here: the API layer validated them
(:mod:`fdiv_kernels.checks`); nothing in this module checks data.

A vocabulary-parallel head (``params.head.vocab``): the backend runs on this rank's shard, the
statistics are combined across the group after its forward (two all-reduces of ``[n]``-sized
tensors) and its backward takes the global ``lse``/entropy and the shard's split of ``g, k``;
``grad_hidden`` is summed over the group (:mod:`.vocab_parallel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import checks
from ..kernels import torch_chunked
from ..kernels.backends import Backend, resolve_backend
from ..specs import HeadSpec
from .vocab_parallel import combine, kernel_labels, split_coefficients, sum_over_shards

__all__ = ["LogpLse", "TokenStats", "TokenStatsFunction", "TokenStatsParams", "stats_result", "token_stats",
           "token_stats_from_logits", "head_logits"]


class LogpLse(NamedTuple):
    """:func:`fdiv_kernels.token_stats` without entropy: ``logp, lse = fk.token_stats(h, w, y)``.

    ``logp``: log-softmax of the logits at the label. ``lse``: log-sum-exp of the logits (the
    state value V(s) of the paper). Shape of ``labels``, float32 (float64 for float64 inputs), 0 at
    ignored positions. ``.entropy`` reads ``None``.
    """

    logp: torch.Tensor
    lse: torch.Tensor

    @property
    def entropy(self) -> None:
        return None


class TokenStats(NamedTuple):
    """:func:`fdiv_kernels.token_stats` with ``return_entropy=True``: ``logp, lse, entropy`` (fields as
    in :class:`LogpLse`; ``entropy``: entropy of softmax(logits))."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor] = None


def stats_result(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor]) -> Union[LogpLse, TokenStats]:
    """A :class:`LogpLse`, or a :class:`TokenStats` when ``entropy`` is given."""
    return LogpLse(logp, lse) if entropy is None else TokenStats(logp, lse, entropy)


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


# ---------------------------------------------------------------------------------------------
# Supervised rows (what every backend receives)
# ---------------------------------------------------------------------------------------------

def supervised_index(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Flat indices of the supervised positions of ``labels``, ``None`` when every position is
    supervised (one host read)."""
    valid = labels.reshape(-1) != ignore_index
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


def valid_rows(hidden: torch.Tensor, labels: torch.Tensor, idx: Optional[torch.Tensor]):
    """``(hidden [n, H], labels [n])`` of the supervised tokens ``idx`` (``None``: all), contiguous,
    labels int64: the layout every backend receives."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if idx is not None:
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    return h.contiguous(), y.long().contiguous()


def valid_grads(idx: Optional[torch.Tensor], lse_v: torch.Tensor, ent_v: Optional[torch.Tensor],
                grad_logp, grad_lse, grad_ent) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The output gradients ``(g, k, e)`` of the supervised tokens ``idx`` (``None``: all), in the
    compute dtype of ``lse_v``; a missing gradient is zero, and ``e`` is ``None`` unless the entropy
    ``ent_v`` was computed and has a gradient (the one entropy-gradient rule of every backend)."""

    def pick(gr):
        if gr is None:
            return torch.zeros_like(lse_v)
        gr = gr.reshape(-1).to(lse_v.dtype)
        return gr if idx is None else gr.index_select(0, idx)

    return pick(grad_logp), pick(grad_lse), (pick(grad_ent) if (grad_ent is not None and ent_v is not None) else None)


def scatter_tokens(v: torch.Tensor, idx: Optional[torch.Tensor], shape) -> torch.Tensor:
    """Per-supervised-token values ``v [n, ...]`` back to ``shape`` (+ trailing dims), 0 elsewhere."""
    out_shape = tuple(shape) + tuple(v.shape[1:])
    if idx is None:
        return v.reshape(out_shape)
    numel = math.prod(shape)
    full = torch.zeros((numel, *v.shape[1:]), dtype=v.dtype, device=v.device)
    return full.index_copy_(0, idx, v).reshape(out_shape)


def backend_options_kw(options) -> dict:
    """``options=`` for a backend that declares options (:attr:`Backend.options`), else nothing."""
    return {} if options is None else {"options": options}


# ---------------------------------------------------------------------------------------------
# Forward and backward as plain functions
# ---------------------------------------------------------------------------------------------

class TokenStatsSaved(NamedTuple):
    """What the backward needs besides the inputs: the supervised index, the supervised ``lse``
    and ``entropy``, the backend and its options as captured at the forward."""

    idx: Optional[torch.Tensor]
    lse_v: torch.Tensor
    ent_v: Optional[torch.Tensor]
    backend: Backend
    options: object


def token_stats_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, params: TokenStatsParams):
    """``(logp, lse, entropy | None, saved)``: the statistics (shape of ``labels``) and a
    :class:`TokenStatsSaved`. No autograd, no checks."""
    backend = resolve_backend(params.head.backend, hidden)
    options = backend.options() if backend.options is not None else None
    idx = supervised_index(labels, params.ignore_index)
    hv, yv = valid_rows(hidden, labels, idx)
    yv, owner = kernel_labels(yv, params.head.vocab)
    bias_c = None if bias is None else bias.contiguous()
    logp_v, lse_v, ent_v = backend.forward(
        hv, weight.contiguous(), bias_c, yv, head=params.head,
        return_entropy=params.return_entropy, **backend_options_kw(options))
    logp_v, lse_v, ent_v = combine(logp_v, lse_v, ent_v if params.return_entropy else None, owner, params.head.vocab)
    shape = labels.shape
    ent = None if ent_v is None else scatter_tokens(ent_v, idx, shape)
    return (scatter_tokens(logp_v, idx, shape), scatter_tokens(lse_v, idx, shape), ent,
            TokenStatsSaved(idx, lse_v, ent_v, backend, options))


def token_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, saved: TokenStatsSaved, params: TokenStatsParams,
                         grad_logp: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                         grad_ent: Optional[torch.Tensor], needs: Tuple[bool, bool, bool]):
    """``(grad_hidden, grad_weight, grad_bias)`` (``None`` where ``needs`` is False) of the
    statistics' gradients, by the backend's backward kernels."""
    hv, yv = valid_rows(hidden, labels, saved.idx)
    head = params.head
    yv, owner = kernel_labels(yv, head.vocab)
    g, k, e = valid_grads(saved.idx, saved.lse_v, saved.ent_v, grad_logp, grad_lse, grad_ent)
    checks.check_coefficients("token_stats backward", grad_logp=g, grad_lse=k, grad_entropy=e)
    g, k = split_coefficients(g, k, owner)
    gh, gw, gb = saved.backend.backward(hv, weight.contiguous(), None if bias is None else bias.contiguous(), yv,
                                        saved.lse_v, saved.ent_v, g, k, e, head=head,
                                        **backend_options_kw(saved.options))
    gh = sum_over_shards(gh, head.vocab) if needs[0] else gh
    grad_hidden = scatter_tokens(gh, saved.idx, labels.shape).to(hidden.dtype) if needs[0] else None
    grad_weight = gw.to(weight.dtype) if needs[1] else None
    grad_bias = gb.to(bias.dtype) if (bias is not None and needs[2]) else None
    return grad_hidden, grad_weight, grad_bias


class TokenStatsFunction(torch.autograd.Function):
    """``autograd.Function`` behind :func:`fdiv_kernels.token_stats`, public for custom modules.

    ``TokenStatsFunction.apply(hidden, weight, bias, labels, params) -> (logp, lse, entropy)``
    with a :class:`TokenStatsParams`; ``entropy`` is an empty tensor unless
    ``params.return_entropy``. Inputs must already be validated (:func:`fdiv_kernels.token_stats`
    does it).

    This function does, once for every backend, what the backends' contract
    (:mod:`fdiv_kernels.kernels.backends`) leaves out: it picks the backend for the tensors' device
    and dtype (the ``"torch"`` reference for a dtype the backend does not declare), passes only
    the supervised rows, contiguous, with int64 labels, captures the backend's options at
    forward for the backward, and passes an entropy gradient only when the entropy was computed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: TokenStatsParams):
        logp, lse, ent, saved = token_stats_forward(hidden, weight, bias, labels, params)
        if ent is None:
            ent = lse.new_empty(0)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, bias, labels, saved.idx, saved.lse_v, saved.ent_v)
        ctx.params, ctx.backend, ctx.options = params, saved.backend, saved.options
        return logp, lse, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_ent):
        hidden, weight, bias, labels, idx, lse_v, ent_v = ctx.saved_tensors
        saved = TokenStatsSaved(idx, lse_v, ent_v, ctx.backend, ctx.options)
        grads = token_stats_backward(hidden, weight, bias, labels, saved, ctx.params, grad_logp, grad_lse, grad_ent,
                                     tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None)


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                params: TokenStatsParams) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, lse, entropy | None)`` through :class:`TokenStatsFunction` (trusted inputs)."""
    logp, lse, ent = TokenStatsFunction.apply(hidden, weight, bias, labels, params)
    return logp, lse, (ent if params.return_entropy else None)


def head_logits(logits: torch.Tensor, head) -> torch.Tensor:
    """``cap(logits) / T`` for the ``head``'s soft-cap ``cap(x) = c tanh(x / c)`` and temperature
    ``T`` (:class:`~fdiv_kernels.specs.HeadSpec`), in float32 (float64 for float64 logits): on the
    ``logits=`` path, what the kernels apply to ``h W^T + b``; ``logits`` themselves without either."""
    if head.softcap is None and head.temperature == 1.0:
        return logits
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return torch_chunked.transform(z, head)[0]


def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                            return_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, lse, entropy | None)`` of ``logits [..., V]`` by plain torch autograd, in float32
    (float64 for float64 logits): the logits are upcast, so bf16/fp16 logits of any magnitude give
    finite results. Ignored rows are replaced by zeros first: whatever they hold (-inf everywhere,
    NaN) never reaches a value or a gradient."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    z = torch.where(valid.unsqueeze(-1), z, zero)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    ent = torch.where(valid, torch_chunked.entropy(z), zero) if return_entropy else None
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), ent
