"""Checkpoints: the model in safetensors (``save_pretrained``, loadable with AutoModelForCausalLM),
the tokenizer, and the trainer state (optimizer, scheduler, RNG, step = data position) in a torch
file read back with ``weights_only=True``. Every file and the checkpoint directory itself are
written to a temporary name first and moved into place with ``os.replace``, so a crash never
leaves a half-written checkpoint under the final name.

Layout of a phase directory (``runs/<name>/<phase>/``)::

    checkpoint-<step>/  model.safetensors config.json tokenizer* trainer_state.pt state.json
    final/              the phase's result (model + tokenizer); its presence marks the phase done
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import torch

from .modeling import unwrap

STATE_FILE = "trainer_state.pt"


def _atomic_dir(final_dir: str):
    tmp = final_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _commit_dir(tmp: str, final_dir: str) -> None:
    if os.path.exists(final_dir):
        old = final_dir.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final_dir)


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """RNG states as tensors / plain lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    st = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_model(model: torch.nn.Module, tok, out_dir: str, *, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Model (safetensors) + tokenizer into ``out_dir``, atomically. ``state_dict``: the full
    weights when the module's own are partitioned (DeepSpeed ZeRO-3)."""
    tmp = _atomic_dir(out_dir)
    unwrap(model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tok is not None:
        tok.save_pretrained(tmp)
    _commit_dir(tmp, out_dir)


def save_checkpoint(phase_dir: str, *, step: int, model, tok, optimizer, scheduler,
                    extra: Optional[Dict[str, Any]] = None, keep: int = 2,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write ``phase_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints.

    ``optimizer`` may be None (DeepSpeed keeps its own optimizer checkpoint next to this one).
    """
    final = os.path.join(phase_dir, f"checkpoint-{step}")
    tmp = _atomic_dir(final)
    unwrap(model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tok is not None:
        tok.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else {},
             "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "extra": extra or {}}
    atomic_torch_save(state, os.path.join(tmp, STATE_FILE))
    atomic_json({"step": step, "extra": extra or {}}, os.path.join(tmp, "state.json"))
    _commit_dir(tmp, final)
    if keep > 0:
        for old in list_checkpoints(phase_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(phase_dir: str):
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
    ck = list_checkpoints(phase_dir)
    return ck[-1] if ck else None


def load_weights(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Load ``model.safetensors`` into ``model`` (tied weights may be absent from the file)."""
    from safetensors.torch import load_file

    m = unwrap(model)
    path = os.path.join(ckpt_dir, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors")
    sd = load_file(path, device=str(next(m.parameters()).device))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(m.config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: missing keys {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


def load_trainer_state(ckpt_dir: str) -> Dict[str, Any]:
    return torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location="cpu", weights_only=True)
