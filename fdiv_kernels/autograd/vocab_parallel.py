"""The reductions of a vocabulary-parallel head: a shard's per-token statistics combined across ranks.

With :attr:`HeadSpec.vocab <fdiv_kernels.specs.HeadSpec>` set (a :class:`~fdiv_kernels.specs.VocabShard`),
each rank's kernels run on its shard ``W_r [V_r, H]`` (rows ``[o_r, o_r + V_r)`` of the vocabulary)
exactly as on a whole head, with the labels this shard holds translated to local ids
(:func:`kernel_labels`; a label held elsewhere gets the valid dummy id 0, whose pick is discarded).
The per-token statistics of the whole head follow from the shards' local ``lse_r``, ``logp_r``,
``ent_r`` (``docs/math.md``, "Vocabulary-parallel statistics"), :func:`combine`:

    m = max_r lse_r                      all-reduce MAX of [n]
    a_r = lse_r - m,  s_r = exp(a_r)
    S = sum_r s_r                        \\
    zy = sum_r [y on r] (logp_r + a_r)    } one all-reduce SUM of [2, n] ([4, n] with entropy)
    A = sum_r s_r ent_r, B = sum_r s_r a_r /
    lse = m + log S,   logp = zy - log S,   ent = (A - B) / S + log S

(``ent`` is the chain rule of entropy, ``sum_r w_r ent_r - sum_r w_r log w_r`` with ``w_r = s_r / S``:
two non-negative sums, no cancellation). Every rank then holds the same statistics, so the spec's
coefficients ``g``, ``k`` (and its host decisions: the log-mean-exp chunks) are the same on every
rank. The kernels' ``grads`` / ``backward`` with the *global* ``lse`` and entropy give the local
slice ``p[:, o_r:o_r + V_r]`` of the softmax; :func:`split_coefficients` passes ``g' = 0``,
``k' = k - g`` on rows whose label is elsewhere, so the local coefficient ``g' onehot + (k' - g') p``
is the slice of ``g onehot + (k - g) p``. ``grad_weight`` and ``grad_bias`` are the shard's own;
``grad_hidden = sum_r coef_r W_r`` is summed over the group (:func:`sum_over_shards`, one
all-reduce of ``[n, H]`` per call), as Megatron's column-parallel head does.

Nothing here checks data: the API layer resolved and checked the shard (:mod:`fdiv_kernels.checks`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..specs import VocabShard

__all__ = ["all_gather_rows", "combine", "kernel_labels", "split_coefficients", "sum_over_shards"]


def all_gather_rows(group, row: torch.Tensor) -> torch.Tensor:
    """``[W, k]``: every rank's ``row [k]``, in the group's rank order (one all-gather)."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row.contiguous(), group=group)
    return torch.stack(rows)


def kernel_labels(y: torch.Tensor, vocab: Optional[VocabShard]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(labels for this shard's kernels, owner)``: global ids ``y [n]`` (int64) as local ids of
    the shard, the dummy 0 where the label is on another shard; ``owner [n]`` bool marks the rows
    whose label this shard holds. ``(y, None)`` without a shard."""
    if vocab is None:
        return y, None
    local = y - vocab.offset
    owner = (local >= 0) & (local < vocab.size)
    return torch.where(owner, local, torch.zeros_like(local)), owner


def combine(logp: torch.Tensor, lse: torch.Tensor, ent: Optional[torch.Tensor], owner: Optional[torch.Tensor],
            vocab: Optional[VocabShard]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The whole head's ``(logp, lse, entropy | None)`` ``[n]`` from this shard's (module
    docstring): two all-reduces over the group, of ``[n]`` and ``[2, n]`` (``[4, n]`` with entropy)
    numbers. Identity without a shard."""
    if vocab is None:
        return logp, lse, ent
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=vocab.group)
    zero = lse.new_zeros(())
    m_safe = torch.where(torch.isfinite(m), m, zero)  # every shard -inf (a fully masked row): lse = -inf below
    a = lse - m_safe
    s = torch.exp(a)
    live = s > 0  # a shard whose logits are all -inf adds nothing (its ent_r, logp_r are NaN)
    # the label's logit relative to m; -inf when its shard is fully masked (the label's logit is -inf)
    zy = torch.where(owner, torch.where(live, logp + a, lse.new_full((), -math.inf)), zero)
    parts = [s, zy]
    if ent is not None:
        parts += [torch.where(live, s * ent, zero), torch.where(live, s * a, zero)]
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=vocab.group)
    log_s = torch.log(packed[0])
    ent_g = None if ent is None else (packed[2] - packed[3]) / packed[0] + log_s
    return packed[1] - log_s, m_safe + log_s, ent_g


def split_coefficients(g: torch.Tensor, k: torch.Tensor,
                       owner: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g', k')`` for this shard's kernels: ``(g, k)`` where it holds the label, ``(0, k - g)``
    elsewhere (module docstring). Identity without a shard."""
    if owner is None:
        return g, k
    zero = g.new_zeros(())
    return torch.where(owner, g, zero), torch.where(owner, k, k - g)


def sum_over_shards(t: Optional[torch.Tensor], vocab: Optional[VocabShard]) -> Optional[torch.Tensor]:
    """``t`` summed over the group in place (``grad_hidden``: one all-reduce); ``t`` itself without
    a shard (or a tensor)."""
    if vocab is None or t is None:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=vocab.group)
    return t
