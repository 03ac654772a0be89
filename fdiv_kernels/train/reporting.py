"""Where metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``--report-to``).

Both are optional extras (``pip install 'fdiv-kernels[tensorboard]'`` / ``[wandb]``), off by
default, written by rank 0 only, through their own libraries:

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<run>/tensorboard``; a step
  record's metrics as scalars ``<phase>/<metric>`` at its step, an evaluation record's as
  ``eval/<model>/<metric>``.
* ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "fdiv-kernels", name=<run name>,
  dir=<run>, config=<the resolved config>)``; each phase gets its own step axis
  (``wandb.define_metric("<phase>/*", step_metric="<phase>/step")``) since every phase counts
  from 1. ``WANDB_MODE=offline`` and the other ``WANDB_*`` variables apply as usual.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List, Sequence

from ..errors import ConfigError

REPORTERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(names: Sequence[str]) -> None:
    """Known reporters whose library is installed (:class:`ConfigError` otherwise)."""
    for n in names:
        if n not in REPORTERS:
            raise ConfigError(f"report_to: unknown reporter {n!r}; use {', '.join(REPORTERS)}")
        if importlib.util.find_spec(_PACKAGES[n]) is None:
            raise ConfigError(f"report_to {n} needs the {_PACKAGES[n]} package: pip install 'fdiv-kernels[{n}]'")


def _scalars(record: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _tag(record: Dict[str, Any]) -> str:
    phase = record.get("phase", "train")
    return f"eval/{record['model']}" if phase == "eval" and "model" in record else phase


class TensorBoardReporter:
    def __init__(self, run_dir: str, config: Dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        tag, step = _tag(record), int(record.get("step", 0))
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"{tag}/{k}", v, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, run_dir: str, config: Dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fdiv-kernels"), name=config.get("name"),
                              dir=run_dir, config=config)
        self.axes: set = set()

    def write(self, record: Dict[str, Any]) -> None:
        tag = _tag(record)
        if tag not in self.axes:  # every phase counts its steps from 1: one step axis per phase
            self.wandb.define_metric(f"{tag}/step")
            self.wandb.define_metric(f"{tag}/*", step_metric=f"{tag}/step")
            self.axes.add(tag)
        self.wandb.log({f"{tag}/step": int(record.get("step", 0)),
                        **{f"{tag}/{k}": v for k, v in _scalars(record).items()}})

    def close(self) -> None:
        self.run.finish()


def make_reporters(names: Sequence[str], run_dir: str, config: Dict[str, Any]) -> List[Any]:
    classes = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [classes[n](run_dir, config) for n in names]
