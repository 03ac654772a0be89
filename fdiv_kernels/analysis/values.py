"""State values V(s) = logsumexp of the logits (paper Theorem 2), computed with the fused primitive.

All functions run the model body to the last hidden states and take the log-sum-exp of the
model's logits (``hidden @ lm_head.weight.T`` with the logit scale and soft-cap its config sets,
:func:`fdiv_kernels.hf.head_spec`) at the requested positions only, through
:func:`fdiv_kernels.token_stats` (so the logits of a whole sequence are never stored).
Position ``t`` is the state after reading tokens ``0..t``: the value of "what comes next".
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import fdiv_kernels as fk

from ..hf import head_inputs, load_model, load_tokenizer


def state_values(model, input_ids: torch.Tensor, positions: torch.Tensor, *,
                 attention_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``lse`` of the logits at ``positions`` (bool ``[B, T]``); returns ``[B, T]`` fp32, 0 elsewhere."""
    if positions.shape != input_ids.shape or positions.dtype != torch.bool:
        raise ValueError(f"positions must be a bool tensor of shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        x = head_inputs(model, input_ids, attention_mask, backend=backend)
        labels = torch.where(positions, torch.zeros_like(input_ids), torch.full_like(input_ids, -100))
        return fk.token_stats(x.hidden, x.weight, labels, bias=x.bias, softcap=x.head.softcap,
                              temperature=x.head.temperature, backend=x.head.backend).lse


def value_s0(model, tok, prompts: Sequence[str], *, batch_size: int = 32, backend: str = "auto") -> torch.Tensor:
    """V(s0) per prompt: lse at the last prompt token, i.e. the state predicting the first response token.

    ``prompts`` are full model inputs (e.g. chat-templated with the generation prompt). ``[N]`` fp32.
    """
    out = []
    device = next(model.parameters()).device
    for s in range(0, len(prompts), batch_size):
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[s:s + batch_size]]
        t = max(len(e) for e in enc)
        ids = torch.full((len(enc), t), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        pos = torch.zeros_like(ids, dtype=torch.bool)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
            pos[i, len(e) - 1] = True
        v = state_values(model, ids.to(device), pos.to(device), attention_mask=mask.to(device), backend=backend)
        out.append(v[pos.to(device)])
    return torch.cat(out)


def segment_values(model, tok, prompt: str, response: str, *, separator: str = "\n",
                   backend: str = "auto") -> Tuple[List[str], torch.Tensor]:
    """Values at the end of each segment of ``response`` (Sec. 4.4: reasoning steps split on newlines).

    Returns ``(segments, values [S])``: ``values[i]`` is lse at the token holding the last
    character of segment ``i`` (the state after step ``i``). Needs a fast tokenizer (offsets).
    """
    text = prompt + response
    segments, ends, start = [], [], len(prompt)
    for seg in response.split(separator):
        if seg:
            segments.append(seg)
            ends.append(start + len(seg) - 1)  # character index of the segment's last character
        start += len(seg) + len(separator)
    if not segments:
        raise ValueError("response has no non-empty segment")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    pos = torch.zeros_like(ids, dtype=torch.bool)
    token_of = []
    for c in ends:
        t = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= c < b)
        token_of.append(t)
        pos[0, t] = True
    device = next(model.parameters()).device
    v = state_values(model, ids.to(device), pos.to(device), backend=backend)[0]
    return segments, v[torch.tensor(token_of, device=device)]


def value_s0_curve(phase_dir: str, prompts: Sequence[str], *, backend: str = "auto") -> List[Dict[str, float]]:
    """Mean/std of V(s0) over ``prompts`` for every checkpoint of a trainer phase directory.

    ``phase_dir`` is e.g. ``runs/demo/sft``; each ``checkpoint-<step>`` (and ``final``) is loaded with
    transformers (safetensors). Returns ``[{"step", "mean", "std", "path"}]`` ordered by step.
    """
    from ..runs import list_checkpoints  # the trainer's run layout

    ckpts = [(int(os.path.basename(p).split("-")[1]), p) for p in list_checkpoints(phase_dir)]
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint-<step> directories under {phase_dir!r}")
    rows = []
    for step, path in ckpts:
        model = load_model(path)
        tok = load_tokenizer(path)
        v = value_s0(model, tok, prompts, backend=backend)
        rows.append({"step": step, "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
                     "path": path})
    return rows
