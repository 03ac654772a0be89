"""Batches of token-id examples for the fused losses, shared by the trainer and the analysis tools.

An example is ``{"input_ids": [...], "labels": [...]}`` (``labels`` unshifted, ``-100`` =
:data:`IGNORE_INDEX` where nothing is supervised); a preference pair is ``{"chosen": example,
"rejected": example}`` (:func:`fdiv_kernels.train.data.encode_sft` / ``encode_pref`` make them).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

#: the label of positions that are not supervised (prompt, template tokens, padding)
IGNORE_INDEX = -100


def collate(examples: Sequence[Dict[str, List[int]]], *, pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``/``labels``/``attention_mask`` ``[B, T]`` int64.

    ``labels`` are NOT shifted (``labels[t]`` is the token at ``t``); -100 on padding.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    t = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_pairs(examples: Sequence[Dict[str, Dict[str, List[int]]]], *, pad_id: int) -> Dict[str, torch.Tensor]:
    """Preference pairs as one ``[2B, T]`` batch: rows ``0..B-1`` chosen, ``B..2B-1`` rejected."""
    return collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id=pad_id)
