"""PNG plots of a run's ``metrics.jsonl`` (matplotlib, Agg backend, no display needed).

``plots/<phase>.png``: one panel per metric (loss, NLL, V(s0), alignment, KL to the reference,
grad norm, learning rate, tokens/s); ``plots/task_accuracy.png``: accuracy of base / SFT / DPO.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional

PANELS = ("loss", "nll", "value_s0", "align_dpo_loss", "align_accuracy", "logratio_ref", "kl_ref_heldout", "dpo_loss",
          "accuracy", "margin", "logp_chosen", "mix_lambda", "mix_dpo_accuracy", "grad_norm", "lr", "tokens_per_s")


def read_metrics(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, *, accuracy: Optional[Dict[str, float]] = None) -> List[str]:
    """Write the PNGs for ``run_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    by_phase: Dict[str, List[dict]] = defaultdict(list)
    for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        by_phase[r.get("phase", "train")].append(r)
    written = []
    for phase, rows in by_phase.items():
        names = [n for n in PANELS if any(n in r for r in rows)]
        if not names:
            continue
        cols = 3
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
        for ax, n in zip(axes.flat, names):
            pts = [(r["step"], r[n]) for r in rows if n in r and r[n] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(n)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{os.path.basename(run_dir.rstrip('/'))}: {phase}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{phase}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    if accuracy:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(list(accuracy), [100 * v for v in accuracy.values()], color=["#999", "#4a7", "#47a", "#a74"][: len(accuracy)])
        for i, v in enumerate(accuracy.values()):
            ax.text(i, 100 * v + 1, f"{100 * v:.1f}%", ha="center")
        ax.set_ylabel("task accuracy (%)")
        ax.set_ylim(0, 105)
        fig.tight_layout()
        path = os.path.join(out_dir, "task_accuracy.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
