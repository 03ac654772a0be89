"""Literal torch translations of the paper's objectives: the baselines ``fk.loss`` replaces.

These are written the way a researcher would type them from the paper (probability space,
``exp`` of sequence log-probs, ``exp(dV)``, clipping into the domain of ``f*``). They exist to
be measured against (``bench/``, ``tests/test_stability.py``, the mini-lab) and are *not* meant
for training. Every function returns per-sequence losses ``[B]`` to minimise.

Inputs are per-sequence tensors ``[B]``: ``logp`` = log pi(y|x) (sum over response tokens),
``ref_logp`` = log pi_ref(y|x), ``v_s0``/``v_st`` = V(s0) and V(s_t) (log-sum-exp of the logits at
the first and last response positions), ``dv = v_s0 - v_st``.
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def table4_tv(logp, ref_logp, v_s0, v_st, beta=1.0):
    """Table 4, TV row: maximise ``beta*log pi + log pi_ref - V(s_t)``."""
    return -(beta * logp + ref_logp - v_st)


def table4_squared_hellinger(logp, ref_logp, v_s0, v_st, beta=1.0):
    """Table 4, squared Hellinger row: ``sqrt(pi_ref) * exp(dV/2) - sqrt(pi)``."""
    dv = v_s0 - v_st
    return torch.sqrt(torch.exp(ref_logp)) * torch.exp(dv / 2) - torch.sqrt(torch.exp(logp))


def table4_js(logp, ref_logp, v_s0, v_st, beta=1.0):
    """Table 4, Jensen-Shannon row: ``log(1 + exp(log pi_ref + dV)) - log(1 + exp(log pi))``."""
    dv = v_s0 - v_st
    return torch.log(1 + torch.exp(ref_logp + dv)) - torch.log(1 + torch.exp(logp))


def table4_pearson(logp, ref_logp, v_s0, v_st, beta=1.0):
    """Table 4, Pearson chi2 row: ``pi - pi_ref * exp(dV)``."""
    dv = v_s0 - v_st
    return torch.exp(logp) - torch.exp(ref_logp) * torch.exp(dv)


def naive_kl(logp, ref_logp, v_s0, v_st, beta=1.0):
    """KL at sequence level as usually written: ``-phi(r) = exp(-r - 1)``, ``r = beta*log(pi/pi_ref) + dV``."""
    r = beta * (logp - ref_logp) + (v_s0 - v_st)
    return torch.exp(-r - 1)


def naive_js(logp, ref_logp, v_s0, v_st, beta=1.0, eps=1e-6):
    """JS at sequence level with clipping into the domain: ``-log(2 - exp(-r))``, ``r >= -log 2 + eps``."""
    r = beta * (logp - ref_logp) + (v_s0 - v_st)
    r = torch.clamp(r, min=-LOG2 + eps)
    return -torch.log(2 - torch.exp(-r))


PAPER_FORMS = {
    "tv": table4_tv,
    "squared_hellinger": table4_squared_hellinger,
    "js": table4_js,
    "pearson": table4_pearson,
}
NAIVE_FORMS = {"kl": naive_kl, "js": naive_js}


def literal_loss(name: str, logp, ref_logp, v_s0, v_st, beta: float = 1.0, naive: bool = False):
    """Mean literal loss for ``name``: a Table 4 form, or with ``naive=True`` the naive KL/JS forms."""
    table = NAIVE_FORMS if naive else PAPER_FORMS
    if name not in table:
        raise ValueError(f"no literal form for {name!r}; known: {sorted(table)}")
    return table[name](logp, ref_logp, v_s0, v_st, beta).mean()
