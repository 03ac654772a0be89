"""Tiny run configs shared by the trainer tests (a 1-2 layer Llama, a few dozen synthetic rows)."""

import copy

from fdiv_kernels.train.config import from_dict


def tiny_run(out, name, *, layers=1, seed=5, **sections):
    """A :class:`RunConfig` for ``out/name``: tiny model and data, no task grading, torch backend,
    one thread, no progress bar. ``sections`` (``sft={...}``, ``dpo={...}``, ``deepspeed=...``)
    are merged over these defaults, one level deep."""
    d = {
        "name": name, "output_dir": str(out), "backend": "torch", "progress": False, "seed": seed, "num_threads": 1,
        "model": {"tiny": {"hidden_size": 16, "num_layers": layers, "num_heads": 2, "intermediate_size": 32}},
        "data": {"max_length": 32, "max_eval_pairs": 8,
                 "synthetic": {"n_sft": 32, "n_pref": 16, "n_eval": 8, "n_pretrain": 8}},
        "eval": {"task_accuracy": False},
    }
    for k, v in sections.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else copy.deepcopy(v)
    return from_dict(d)
