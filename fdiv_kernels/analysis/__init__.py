"""Value (log-sum-exp) analysis of the paper's Sec. 4.4-4.5 (CLI: ``fdiv-analyze``).

* :mod:`.values`: V(s) = lse of the logits at chosen positions; V(s0) of prompts; values at the
  boundaries of response segments (reasoning steps); V(s0) curves over a run's checkpoints.
* :mod:`.ranking`: Kendall's tau-b, and agreement of value rankings across models and with
  outcome rankings.
* :mod:`.alignment`: the implicit-reward alignment metric (:class:`AlignmentEval`; the trainer
  evaluates with it).

Models are read with :mod:`fdiv_kernels.hf` (the logit scale and soft-cap of the config
included); data files and run directories in the trainer's formats (:mod:`fdiv_kernels.train.data`,
``train.checkpoint.list_checkpoints``).
"""

from .ranking import kendall_tau, rank_agreement
from .values import segment_values, state_values, value_s0, value_s0_curve

__all__ = ["kendall_tau", "rank_agreement", "segment_values", "state_values", "value_s0", "value_s0_curve"]
