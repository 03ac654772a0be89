"""Checkpoints: the model in safetensors (``save_pretrained``, loadable with AutoModelForCausalLM),
the tokenizer, and the trainer state (optimizer, scheduler, RNG, step = data position) in a torch
file read back with ``weights_only=True``. Every file and the checkpoint directory itself are
written to a temporary name first and moved into place with ``os.replace``, so a crash never
leaves a half-written checkpoint under the final name.

Layout of a phase directory (``runs/<name>/<phase>/``)::

    checkpoint-<step>/  model.safetensors config.json tokenizer* trainer_state.pt checksums.json state.json
    final/              the phase's result (model + tokenizer + checksums.json); marks the phase done
    deepspeed/step-<k>/ fsdp/step-<k>/   per-rank engine checkpoints (DeepSpeed; sharded FSDP2)

Every save is verified (the weights file exists and holds every parameter with its full shape,
else :class:`CheckpointError`); a resume re-checks the checksums and falls back to the newest
checkpoint that passes (:func:`checkpoint_problem`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..hf import unwrap
from ..runs import STATE_FILE, WEIGHTS, list_checkpoints
from .modeling import persistent, tensor_aliases


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


CHECKSUMS = "checksums.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def _write_checksums(d: str, names) -> None:
    atomic_json({n: _sha256(os.path.join(d, n)) for n in names if os.path.exists(os.path.join(d, n))},
                os.path.join(d, CHECKSUMS))


def expected_weights(model: torch.nn.Module) -> List[Tuple[List[str], Tuple[int, ...]]]:
    """``[(names, full shape)]`` of every tensor ``save_pretrained`` must write (tied names grouped)."""
    from ..hf import full_shape

    m = unwrap(model)
    return [(names, tuple(full_shape(t))) for names, t in tensor_aliases(m) if persistent(m, names[0])]


def verify_weights(ckpt_dir: str, model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt_dir/model.safetensors`` holds every parameter
    (and persistent buffer) of ``model`` with its full shape."""
    from safetensors import safe_open

    path = os.path.join(ckpt_dir, WEIGHTS)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} was not written (the save produced no weights file)")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    missing, wrong = [], []
    for names, shape in expected_weights(model):
        found = [n for n in names if n in shapes]
        if not found:
            missing.append(names[0])
        elif shapes[found[0]] != shape:
            wrong.append(f"{found[0]} {shapes[found[0]]} != {shape}")
    if missing or wrong:
        raise CheckpointError(f"{path} is incomplete: {len(missing)} tensor(s) missing ({', '.join(missing[:4])}"
                              f"{', ...' if len(missing) > 4 else ''}), {len(wrong)} with a wrong shape "
                              f"({'; '.join(wrong[:2])})")


def _save_weights(model: torch.nn.Module, out_dir: str, state_dict: Optional[Dict[str, torch.Tensor]]) -> None:
    # transformers 5 empties the state_dict it is given: hand it a shallow copy, every time
    sd = dict(state_dict) if state_dict is not None else None
    unwrap(model).save_pretrained(out_dir, safe_serialization=True, state_dict=sd)
    verify_weights(out_dir, model)


def save_model(model: torch.nn.Module, tok, out_dir: str, *, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Model (safetensors) + tokenizer into ``out_dir``, atomically, verified. ``state_dict``: the
    full weights when the module's own are partitioned (DeepSpeed ZeRO-3, FSDP2)."""
    tmp = _atomic_dir(out_dir)
    _save_weights(model, tmp, state_dict)
    if tok is not None:
        tok.save_pretrained(tmp)
    _write_checksums(tmp, [WEIGHTS])
    _commit_dir(tmp, out_dir)


def save_checkpoint(phase_dir: str, *, step: int, model, tok, optimizer_state: Dict[str, Any], scheduler,
                    extra: Optional[Dict[str, Any]] = None, keep: int = 2,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None, weights: bool = True) -> str:
    """Write ``phase_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints.

    ``optimizer_state`` is ``{}`` when an engine keeps its own optimizer checkpoint (DeepSpeed,
    sharded FSDP2); ``weights=False`` writes no ``model.safetensors`` (sharded FSDP2: the
    weights are in the engine's shards). ``checksums.json`` lets a resume detect damaged files.
    """
    final = os.path.join(phase_dir, f"checkpoint-{step}")
    tmp = _atomic_dir(final)
    if weights:
        _save_weights(model, tmp, state_dict)
    else:
        unwrap(model).config.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "extra": extra or {}}
    atomic_torch_save(state, os.path.join(tmp, STATE_FILE))
    _write_checksums(tmp, [WEIGHTS, STATE_FILE])
    atomic_json({"step": step, "extra": extra or {}}, os.path.join(tmp, "state.json"))
    _commit_dir(tmp, final)
    if keep > 0:
        for old in list_checkpoints(phase_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def prune_shards(phase_dir: str, subdir: Optional[str]) -> None:
    """Remove ``phase_dir/<subdir>/step-<k>`` engine folders whose ``checkpoint-<k>`` is gone."""
    if not subdir:
        return
    root = os.path.join(phase_dir, subdir)
    if not os.path.isdir(root):
        return
    kept = {checkpoint_step(c) for c in list_checkpoints(phase_dir)}
    for d in os.listdir(root):
        m = re.fullmatch(r"step-(\d+)", d)
        if m and int(m.group(1)) not in kept:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def checkpoint_step(ckpt_dir: str) -> int:
    return int(os.path.basename(os.path.normpath(ckpt_dir)).rsplit("-", 1)[1])


def checkpoint_problem(ckpt_dir: str, model: Optional[torch.nn.Module] = None, *, weights: bool = True,
                       shard_dir: Optional[str] = None) -> Optional[str]:
    """Why ``ckpt_dir`` cannot be resumed from, or None: a file missing or failing its checksum,
    an unreadable trainer state, weights that do not match ``model``, a missing engine folder."""
    sums_path = os.path.join(ckpt_dir, CHECKSUMS)
    sums = {}
    if os.path.exists(sums_path):
        try:
            with open(sums_path, encoding="utf-8") as f:
                sums = json.load(f)
        except ValueError:
            return f"{CHECKSUMS} is not valid JSON"
    needed = [STATE_FILE] + ([WEIGHTS] if weights else [])
    for name in needed:
        path = os.path.join(ckpt_dir, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if name in sums and _sha256(path) != sums[name]:
            return f"{name} does not match its checksum (damaged or changed after the save)"
    try:
        load_trainer_state(ckpt_dir)
    except Exception as e:  # torch raises several types for truncated / foreign files
        return f"{STATE_FILE} cannot be read ({type(e).__name__})"
    if weights and model is not None:
        try:
            verify_weights(ckpt_dir, model)
        except CheckpointError as e:
            return str(e)
    if shard_dir is not None and not os.path.isdir(shard_dir):
        return f"its engine checkpoint {shard_dir} is missing"
    return None


def final_problem(final_dir: str, model: Optional[torch.nn.Module] = None) -> Optional[str]:
    """Why a phase's ``final/`` directory is not a complete result, or None."""
    path = os.path.join(final_dir, WEIGHTS)
    if not os.path.exists(path):
        return f"{WEIGHTS} is missing"
    sums_path = os.path.join(final_dir, CHECKSUMS)
    if os.path.exists(sums_path):
        with open(sums_path, encoding="utf-8") as f:
            if _sha256(path) != json.load(f).get(WEIGHTS):
                return f"{WEIGHTS} does not match its checksum"
    if model is not None:
        try:
            verify_weights(final_dir, model)
        except CheckpointError as e:
            return str(e)
    return None


def load_weights(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Load ``model.safetensors`` into ``model`` (tied weights may be absent from the file)."""
    from safetensors.torch import load_file

    m = unwrap(model)
    path = os.path.join(ckpt_dir, WEIGHTS)
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS}")
    sd = load_file(path, device=str(next(m.parameters()).device))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(m.config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: missing keys {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


def load_trainer_state(ckpt_dir: str) -> Dict[str, Any]:
    return torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location="cpu", weights_only=True)


def resume_point(phase_dir: str, model: Optional[torch.nn.Module] = None, *, weights: bool = True,
                 shard_subdir: Optional[str] = None, log=print) -> Optional[str]:
    """The newest checkpoint of a phase that passes :func:`checkpoint_problem`; every newer one
    that does not is reported through ``log`` (and left on disk for inspection)."""
    for c in reversed(list_checkpoints(phase_dir)):
        shard = os.path.join(phase_dir, shard_subdir, f"step-{checkpoint_step(c)}") if shard_subdir else None
        why = checkpoint_problem(c, model, weights=weights, shard_dir=shard)
        if why is None:
            return c
        log(f"[resume] {c} cannot be resumed from: {why}; falling back to the previous checkpoint")
    return None
