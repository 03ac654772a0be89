"""Gradient accumulation of one optimizer step, exact for losses with a log-mean-exp over the
whole global batch (the SFT divergences ``kl`` and ``squared_hellinger``; ``docs/math.md``,
"Gradient accumulation of the log-mean-exp divergences").

A phase's micro-batch loss is either a tensor (a sum over units already divided by the step's
global count: summed over micro-batches and averaged over processes it is the global loss) or a
:class:`LogMeanExpLoss`: ``log_sum = A_j = log sum_i psi_i`` over the micro-batch's units plus
such a ``linear`` tensor. The step's loss is then ``log(sum_j e^{A_j} / n) + linear`` with
``n`` and the sum over every micro-batch of every process, and its gradient
``sum_j e^{A_j - L} dA_j + d linear`` (``L = logsumexp_j A_j``). :class:`StepBackward` builds it
with one backward per micro-batch:

* the accumulated ``.grad`` is kept in the frame of the running total ``L`` of this process
  (:class:`~fdiv_kernels.specs.LogSumExpAccumulator`: rescaled by ``exp(L_old - L_new)``, then
  ``exp(A_j - L_new) * A_j`` back-propagated);
* before the last micro-batch's backward (the one that all-reduces under DDP), one all-gather of
  the processes' totals gives the global ``L``; ``.grad`` is rescaled by
  ``world_size * exp(L_rank - L)`` and the last part weighted by ``world_size * exp(A_j - L)``
  (DDP averages over processes);
* the linear terms must not be rescaled: on the micro-batches before the last, their gradient
  goes to a separate buffer (``torch.autograd.grad`` on the retained graph: a second backward
  through the model on those micro-batches), added to ``.grad`` before the last backward.

Engines whose gradients cannot be rescaled in place (DeepSpeed, which owns its gradient buffers;
FSDP2 on several processes, which reduce-scatters every micro-batch) are exact with one
micro-batch per process; with more, each micro-batch's log-mean-exp over its own units is
weighted by ``1 / num_micro_batches`` (the objective then depends on ``micro_batch_size``; a
warning says so once). The logged loss is always the global one.
"""

from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional, Union

import torch

from .. import LogSumExpAccumulator
from .distributed import all_gather_floats


class LogMeanExpLoss(NamedTuple):
    """A micro-batch's loss whose log-mean-exp part runs over the step's whole global batch.

    ``log_sum``: 0-d ``A_j = log sum_i psi_i`` over this micro-batch's ``count`` units
    (differentiable; any finite value with a zero gradient when ``count`` is 0);
    ``global_count``: the units of the whole step (every micro-batch of every process);
    ``linear``: the rest, a 0-d tensor scaled like any plain micro-batch loss.
    """

    log_sum: torch.Tensor
    count: float
    global_count: float
    linear: torch.Tensor


MicroLoss = Union[torch.Tensor, LogMeanExpLoss]


def add_linear(loss: MicroLoss, extra: torch.Tensor) -> MicroLoss:
    """``loss + extra`` for a plain term ``extra`` (e.g. the mix-DPO term)."""
    if isinstance(loss, LogMeanExpLoss):
        return loss._replace(linear=loss.linear + extra)
    return loss + extra


class StepBackward:
    """Back-propagates the micro-batch losses of one optimizer step (see the module docstring).

    ``engine``: an engine of :mod:`.engines` (``backward``, ``params``, ``grads_rescalable``).
    Call it once per micro-batch, in order, inside the engine's ``micro_context``; after the last
    one, :meth:`log_mean_exp` is the global value of the log-mean-exp part (0 when there is none).
    """

    def __init__(self, engine, *, num_micro: int, world_size: int, device: torch.device):
        self.engine, self.num_micro, self.world_size, self.device = engine, num_micro, world_size, device
        self.acc = LogSumExpAccumulator()
        self.global_total = -math.inf
        self.global_count = 0.0
        self.lme = False
        self._linear_grads: Optional[List[Optional[torch.Tensor]]] = None
        self.exact = bool(getattr(engine, "grads_rescalable", False)) or num_micro == 1

    def __call__(self, i: int, loss: MicroLoss) -> None:
        if not isinstance(loss, LogMeanExpLoss):
            self.engine.backward(loss)
            return
        self.lme = True
        self.global_count = float(loss.global_count)
        last = i == self.num_micro - 1
        a = float(loss.log_sum.detach()) if loss.count > 0 else -math.inf
        before = self.acc.total
        rescale, weight = self.acc.add(a, count=int(loss.count))
        if last:
            self.global_total = self._gather(self.acc.total)
        if not self.exact:
            self._approximate(loss, last)
            return
        if not last:
            self._scale_grads(rescale)
            if loss.linear.requires_grad:
                self._keep_linear_grads(loss.linear)
            self.engine.backward(weight * loss.log_sum)
            return
        w = float(self.world_size)
        g = self.global_total
        self._scale_grads(w * math.exp(before - g) if before > -math.inf else 0.0)
        self._add_linear_grads()
        part = w * math.exp(a - g) if a > -math.inf else 0.0
        self.engine.backward(part * loss.log_sum + loss.linear)

    def log_mean_exp(self) -> float:
        """``log(sum of psi over the global batch / its count)``; 0 without a log-mean-exp part or units."""
        if not self.lme or self.global_total == -math.inf:
            return 0.0
        return self.global_total - math.log(max(self.global_count, 1.0))

    # -- helpers --------------------------------------------------------------------------------
    def _gather(self, total: float) -> float:
        """``logsumexp`` of every process's running total (one all-gather of one float each)."""
        totals = [t for t in all_gather_floats(total, self.device) if t > -math.inf]
        if not totals:
            return -math.inf
        m = max(totals)
        return m + math.log(sum(math.exp(t - m) for t in totals))

    def _scale_grads(self, factor: float) -> None:
        if factor == 1.0:
            return
        for p in self.engine.params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def _keep_linear_grads(self, linear: torch.Tensor) -> None:
        params = self.engine.params
        grads = torch.autograd.grad(linear, params, retain_graph=True, allow_unused=True)
        if self._linear_grads is None:
            self._linear_grads = list(grads)
            return
        for k, g in enumerate(grads):
            if g is not None:
                old = self._linear_grads[k]
                self._linear_grads[k] = g if old is None else old.add_(g)

    def _add_linear_grads(self) -> None:
        if self._linear_grads is None:
            return
        for p, g in zip(self.engine.params, self._linear_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._linear_grads = None

    def _approximate(self, loss: LogMeanExpLoss, last: bool) -> None:
        """Engines without in-place rescaling, several micro-batches: each micro-batch's own
        log-mean-exp, weighted ``1 / num_micro`` (a warning once)."""
        if last:
            warnings.warn(f"{type(self.engine).__name__} cannot rescale accumulated gradients: the log-mean-exp "
                          f"loss is averaged over its {self.num_micro} micro-batches, not taken over the global "
                          "batch (use one micro-batch per process for the exact objective)", stacklevel=2)
        own = (loss.log_sum - math.log(loss.count)) / self.num_micro if loss.count > 0 else 0.0 * loss.log_sum
        self.engine.backward(own + loss.linear)
