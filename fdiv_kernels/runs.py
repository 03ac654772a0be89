"""The layout of a run directory, which the trainer writes and ``fdiv-analyze`` reads.

A phase directory (``runs/<name>/<phase>/``) holds ``checkpoint-<step>/`` folders (complete once
their trainer state, :data:`STATE_FILE`, is in place: files are moved in atomically, the state
last) and ``final/`` (:mod:`fdiv_kernels.train.checkpoint` writes them).
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

__all__ = ["STATE_FILE", "WEIGHTS", "latest_checkpoint", "list_checkpoints"]

#: the trainer state of a checkpoint (optimizer, scheduler, RNG, step), read with ``weights_only=True``
STATE_FILE = "trainer_state.pt"
#: a checkpoint's model weights (``save_pretrained``'s safetensors)
WEIGHTS = "model.safetensors"


def list_checkpoints(phase_dir: str) -> List[str]:
    """Complete checkpoint directories of a phase, oldest first."""
    if not os.path.isdir(phase_dir):
        return []
    found = []
    for d in os.listdir(phase_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", d)
        if m and os.path.exists(os.path.join(phase_dir, d, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(phase_dir, d)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(phase_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a phase, or None."""
    ck = list_checkpoints(phase_dir)
    return ck[-1] if ck else None
