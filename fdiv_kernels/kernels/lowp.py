"""Range-safe float16 gradient coefficients.

The triton and cuda backends round the coefficient ``dL/draw`` to the input dtype before the
two gradient GEMMs (as Liger and Cut Cross-Entropy do). bfloat16 has float32's range; float16
overflows above 65504, which a loss with large per-token derivatives reaches although the true
gradients fit (e.g. ``beta = 1e3`` with ``reduction="sum"``). Since ``dL/draw`` is linear in the
per-token derivatives ``(g, k, e) = dL/d(logp, lse, entropy)``, the backends scale those by a
power of two ``s <= 1`` first and the float32 GEMM outputs by ``1 / s`` after: exact (powers of
two), and a no-op (``s = 1``) unless the bound below exceeds :data:`FP16_COEF_LIMIT`.

Bound per token (docs/math.md, the primitive), with ``p <= 1`` and ``E_p[z] = lse - ent``:

    |dL/draw_v| <= (|g| + |k - g| + |e| (ent + 1)) / T

(``p_v |z_v - E_p z| <= ent`` above the mean, ``<= 1/e`` below; the soft-cap derivative is <= 1).
"""

from __future__ import annotations

from typing import Optional

import torch

#: largest coefficient bound let through unscaled (fp16 max 65504, a factor 4 of headroom)
FP16_COEF_LIMIT = 2.0 ** 14


def coef_bound(g: torch.Tensor, k: torch.Tensor, e: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
               temperature: float) -> torch.Tensor:
    """0-d float32 tensor: the bound of the module docstring, max over tokens (no sync)."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    b = g.abs() + (k - g).abs()
    if e is not None:
        b = b + e.abs() * (entropy.clamp(min=0) + 1)
    return b.max().to(torch.float32) / float(temperature)


def fp16_coef_scale(dtype: torch.dtype, g: torch.Tensor, k: torch.Tensor, e: Optional[torch.Tensor] = None,
                    entropy: Optional[torch.Tensor] = None, temperature: float = 1.0) -> Optional[torch.Tensor]:
    """``None`` unless ``dtype`` is float16; else the 0-d power of two ``s <= 1`` (on the device,
    no sync) that brings the coefficient bound under :data:`FP16_COEF_LIMIT`."""
    if dtype != torch.float16:
        return None
    bound = coef_bound(g, k, e, entropy, temperature)
    over = torch.ceil(torch.log2(bound / FP16_COEF_LIMIT)).clamp(min=0)
    return torch.exp2(-over)
