"""Value (log-sum-exp) analysis of the paper's Sec. 4.4-4.5 (CLI: ``fdiv-analyze``).

* :mod:`.values`: V(s) = lse of the logits at chosen positions; V(s0) of prompts; values at the
  boundaries of response segments (reasoning steps); V(s0) curves over a run's checkpoints.
* :mod:`.ranking`: Kendall's tau-b, and agreement of value rankings across models and with
  outcome rankings.
* the implicit-reward alignment metric is :class:`fdiv_kernels.train.evaluate.AlignmentEval`.
"""

from .ranking import kendall_tau, rank_agreement
from .values import segment_values, state_values, value_s0, value_s0_curve

__all__ = ["kendall_tau", "rank_agreement", "segment_values", "state_values", "value_s0", "value_s0_curve"]
