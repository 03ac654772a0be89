"""Input validation shared by the public entry points.

Every check raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad dtypes) with a
message that names the argument, what was expected and what was given.

Two kinds of checks:

* host-side checks of options and shapes (always on, no device sync);
* data checks that read tensor values back (``isnan`` of a reference, ``isfinite`` of the
  results): on by default, one device sync per call (plus the labels range check). Set the
  environment variable ``FDIV_CHECK_FINITE=0`` to turn them off for speed (read at every call);
  then a non-finite input gives whatever the arithmetic gives, without an error. The contract
  (input class -> value, limit or error) is the table in ``docs/math.md``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

#: the one switch of the data checks (see the module docstring)
FINITE_CHECKS_ENV = "FDIV_CHECK_FINITE"

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(choices)}")


def check_beta(beta: float) -> None:
    try:
        ok = math.isfinite(float(beta)) and float(beta) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}")


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels are integers in [0, vocab_size) or equal to ``ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int32 or int64), got {labels.dtype}")
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return  # under torch.compile the custom op that reads the labels runs this check (ops/compiled.py)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(labels[pos])
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {value} at position {pos}"
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               bias: Optional[torch.Tensor], ignore_index: int,
               softcap: Optional[float], temperature: float) -> None:
    """Validate the inputs of a fused LM-head call (``token_stats`` and everything built on it)."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary (shape {tuple(weight.shape)}): softmax needs V >= 1")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal weight's H: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)} (expected weight [V, H] as in nn.Linear(H, V).weight)"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_scalars(softcap, temperature)
    check_labels(labels, weight.shape[0], ignore_index)


def check_scalars(softcap: Optional[float], temperature: float) -> None:
    if softcap is not None and not (_is_real(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if softcap is not None and not math.isfinite(softcap):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap} (softcap=None means no cap)")
    if not (_is_real(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _is_real(x) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def check_finite_number(name: str, value, *, minimum: Optional[float] = None) -> None:
    """``value`` is a finite real number (``>= minimum`` when given)."""
    ok = _is_real(value) and math.isfinite(float(value)) and (minimum is None or float(value) >= minimum)
    if not ok:
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_rows(labels: torch.Tensor) -> None:
    """Losses read rows off ``labels``: at least one dimension (a 1-D ``labels`` is one row)."""
    if labels.dim() == 0:
        raise ValueError("labels must have at least one dimension (a row of tokens), got a 0-d tensor; "
                         "pass labels[None] with hidden[None] for a single token")


# ---------------------------------------------------------------------------------------------
# Data checks (device sync; FDIV_CHECK_FINITE=0 turns them off)
# ---------------------------------------------------------------------------------------------

def finite_checks_enabled() -> bool:
    """Whether the data checks run (``FDIV_CHECK_FINITE``, default on)."""
    return os.environ.get(FINITE_CHECKS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def first_position(bad: torch.Tensor) -> Tuple[int, ...]:
    """Index (a tuple) of the first True entry of ``bad`` (which has one)."""
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def all_finite(tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """0-d bool tensor (no sync): every given tensor is finite everywhere."""
    flag = None
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        f = torch.isfinite(t).all()
        flag = f if flag is None else flag & f
    return torch.ones((), dtype=torch.bool) if flag is None else flag


def check_not_nan(name: str, t: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """``t`` has no NaN (at the positions ``where``, when given)."""
    if not finite_checks_enabled() or t.numel() == 0:
        return
    bad = torch.isnan(t) if where is None else torch.isnan(t) & where
    if bool(bad.any()):
        raise ValueError(f"{name} is NaN at position {first_position(bad)}" +
                         (" (a supervised position)" if where is not None else ""))


def explain_token_stats(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                        labels: torch.Tensor, softcap: Optional[float] = None,
                        temperature: float = 1.0) -> Optional[str]:
    """Why the per-token statistics (shape of ``labels``, 0 where ignored) are not finite, or None.

    ``lse = -inf``: every logit of that token is -inf (a vocabulary masked through the bias);
    ``lse`` NaN/+inf: the logits themselves are not finite (NaN/inf in hidden, weight or bias, or
    ``|z|`` beyond float32); ``logp = -inf`` with a finite ``lse``: the label's logit is -inf.
    """
    logp, lse = logp.detach(), lse.detach()
    entropy = None if entropy is None else entropy.detach()
    lse_bad = ~torch.isfinite(lse)
    if bool(lse_bad.any()):
        pos = first_position(lse_bad)
        if float(lse[pos]) == -math.inf:
            return (f"every logit at position {pos} is -inf (the whole vocabulary is masked, e.g. by a bias of -inf): "
                    f"softmax is undefined there; set labels{list(pos)} to ignore_index")
        head = f" with temperature={temperature:g}" + ("" if softcap is None else f", softcap={softcap:g}")
        return (f"the logits at position {pos} are not finite (log-sum-exp = {float(lse[pos])}): hidden, weight "
                f"or bias hold NaN/inf, or the logits overflow float32{head}")
    lp_bad = ~torch.isfinite(logp)
    if bool(lp_bad.any()):
        pos = first_position(lp_bad)
        y = int(labels[pos])
        if float(logp[pos]) == -math.inf:
            return (f"labels{list(pos)} = {y} is a masked token (its logit is -inf, e.g. through bias), so "
                    f"log pi(label) = -inf; mask that position (ignore_index) or unmask the token")
        return f"the logit of labels{list(pos)} = {y} is not finite (log-prob {float(logp[pos])})"
    if entropy is not None and entropy.numel():
        ent_bad = ~torch.isfinite(entropy)
        if bool(ent_bad.any()):
            pos = first_position(ent_bad)
            return f"the entropy at position {pos} is not finite ({float(entropy[pos])})"
    return None


def check_token_stats(logp: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                      labels: torch.Tensor, softcap: Optional[float] = None, temperature: float = 1.0) -> None:
    """Raise ``ValueError`` (explained) when the statistics are not finite (one sync)."""
    if not finite_checks_enabled():
        return
    if bool(all_finite((logp, lse, entropy))):
        return
    why = explain_token_stats(logp, lse, entropy, labels, softcap, temperature)
    raise ValueError(why or "the token statistics are not finite")


def check_coefficients(where: str, **grads: Optional[torch.Tensor]) -> None:
    """The per-token loss derivatives handed to a backward kernel are finite (a safety net: no
    NaN/inf may reach the gradients unnoticed)."""
    if not finite_checks_enabled():
        return
    present = {k: v for k, v in grads.items() if v is not None and v.numel()}
    if not present or bool(all_finite(tuple(present.values()))):
        return
    for name, g in present.items():
        bad = ~torch.isfinite(g)
        if bool(bad.any()):
            raise ValueError(f"{where}: the loss's derivative {name} is not finite ({float(g.reshape(-1)[bad.reshape(-1)][0])}) "
                             f"at token {first_position(bad)}: the loss built on these statistics has a non-finite "
                             f"gradient there")
