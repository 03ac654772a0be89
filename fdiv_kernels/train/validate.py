"""Checks that run before anything is deleted, loaded or evaluated.

:func:`preflight` takes a loaded :class:`~fdiv_kernels.train.config.RunConfig` and raises a
:class:`~fdiv_kernels.train.errors.ConfigError` (one line naming the key, file or row) for
anything the run cannot use, in this order, all of it before a model is built:

1. values: ranges, choices, batch divisibility for the number of processes, engine settings;
   the loss options by a dry call of ``fk.loss`` / ``fk.dpo_loss`` on a few numbers, so the
   choices are the library's own;
2. paths: the DeepSpeed config, the model (a local directory: ``config.json`` read with
   ``AutoConfig``, a weights file present; a Hugging Face Hub id: its config resolved by
   ``transformers``), the tokenizer (loaded: fast, with a chat template), every data set (a
   file, or a ``datasets`` data set by path or Hub id: read and validated row by row; the rows
   are handed on, not read twice);
3. the run directory: a directory that holds a run is not cleared without ``overwrite``; a
   ``resume`` with a configuration that differs from the run's is refused without
   ``allow_config_change`` (:func:`config_changes` lists the differences);
4. the token_stats backend, last (a named native backend may JIT-build on first use).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Dict, List, Optional

from .config import RunConfig, resolve_config, to_dict
from .synthetic import TASKS, checkable
from ..data import load_pref, load_sft
from ..errors import ConfigError, DataError, ResumeMismatchError, RunDirectoryError
from ..hf import check_model

#: files and folders of a run directory (``--overwrite`` removes exactly these)
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "config.json", "config-history.jsonl", "plots", "pretrain", "sft",
               "dpo", "data", "tensorboard", "wandb")
#: the ones whose presence means the directory holds a (finished or unfinished) run
RUN_MARKERS = ("summary.json", "metrics.jsonl", "pretrain", "sft", "dpo")
#: keys that may change on --resume without --allow-config-change (they do not change the results)
RESUME_FREE_KEYS = ("name", "output_dir", "progress", "num_threads", "report_to")

SCHEDULERS = ("cosine", "linear", "constant")
SFT_REFERENCES = ("auto", "start", "none")
DPO_REJECTED = ("data", "self")
FSDP_CHECKPOINTS = ("full", "sharded")


@dataclasses.dataclass
class Prepared:
    """What the checks read and the run reuses: the tokenizer (None = the built-in one) and the
    validated rows of every configured data file (by path)."""

    tok: Any = None
    rows: Dict[str, List[dict]] = dataclasses.field(default_factory=dict)
    config_changes: List[str] = dataclasses.field(default_factory=list)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def phases_of(cfg: RunConfig, command: str) -> List[str]:
    """The training phases ``command`` runs with ``cfg``."""
    if command == "pipeline":
        return (["pretrain"] if cfg.pretrain.steps > 0 else []) + ["sft", "dpo"]
    return [command]


# ----------------------------------------------------------------------------------------------
# 1. values
# ----------------------------------------------------------------------------------------------

def check_values(cfg: RunConfig, command: str, world_size: int = 1) -> None:
    """Ranges and choices of every key the command uses (no file access)."""
    from ..hf import DTYPES

    _need(command in ("sft", "dpo", "pipeline"), f"unknown command {command!r}")
    _need(bool(cfg.name) and cfg.name not in (".", "..") and not os.path.isabs(cfg.name),
          f"name {cfg.name!r} must be a non-empty relative name (the run directory is output_dir/name)")
    _need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda":
        import torch

        _need(torch.cuda.is_available(), "device: cuda was asked for, but torch sees no CUDA device")
    _need(cfg.num_threads >= 0, f"num_threads must be >= 0, got {cfg.num_threads}")
    from .reporting import check_report_to

    check_report_to(cfg.report_to)
    _need(not (cfg.deepspeed and cfg.fsdp.enabled), "use either deepspeed or fsdp, not both")
    _need(cfg.fsdp.checkpoint in FSDP_CHECKPOINTS,
          f"fsdp.checkpoint must be one of {', '.join(FSDP_CHECKPOINTS)}, got {cfg.fsdp.checkpoint!r}")
    _need(cfg.fsdp.mixed_precision in (None, "bfloat16", "bf16", "float16", "fp16"),
          f"fsdp.mixed_precision must be null, bfloat16 or float16, got {cfg.fsdp.mixed_precision!r}")
    m = cfg.model
    _need(m.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
    t = m.tiny
    for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        _need(getattr(t, k) >= 1, f"model.tiny.{k} must be >= 1, got {getattr(t, k)}")
    _need(t.hidden_size % t.num_heads == 0,
          f"model.tiny.hidden_size {t.hidden_size} must be divisible by model.tiny.num_heads {t.num_heads}")
    d = cfg.data
    _need(d.max_length >= 2, f"data.max_length must be >= 2, got {d.max_length}")
    _need(d.max_eval_pairs >= 1, f"data.max_eval_pairs must be >= 1, got {d.max_eval_pairs}")
    s = d.synthetic
    bad = [x for x in s.tasks if x not in TASKS]
    _need(bool(s.tasks) and not bad, f"data.synthetic.tasks must be a non-empty list of {', '.join(TASKS)}; got {s.tasks}")
    for k in ("n_sft", "n_pref", "n_eval", "n_pretrain"):
        _need(getattr(s, k) >= 1, f"data.synthetic.{k} must be >= 1, got {getattr(s, k)}")
    _need(0 <= s.pretrain_noise <= 1, f"data.synthetic.pretrain_noise must be in [0, 1], got {s.pretrain_noise}")
    e = cfg.eval
    for k in ("num_prompts", "max_new_tokens", "batch_size", "align_batch_size", "kl_prompts", "kl_batch_size"):
        _need(getattr(e, k) >= 1, f"eval.{k} must be >= 1, got {getattr(e, k)}")
    _need(_finite(e.align_beta) and e.align_beta > 0, f"eval.align_beta must be > 0, got {e.align_beta}")
    for phase in phases_of(cfg, command):
        _check_optim(phase, getattr(cfg, phase), world_size)
    if cfg.pretrain.steps > 0 and command == "pipeline":
        _need(cfg.pretrain.seq_length >= 2, f"pretrain.seq_length must be >= 2, got {cfg.pretrain.seq_length}")
    if command in ("sft", "pipeline"):
        _need(cfg.sft.reference in SFT_REFERENCES,
              f"sft.reference must be one of {', '.join(SFT_REFERENCES)}, got {cfg.sft.reference!r}")
        mx = cfg.sft.mix_dpo
        if mx.enabled:
            _need(_finite(mx.lambda_init) and mx.lambda_init > 0, f"sft.mix_dpo.lambda_init must be > 0, got {mx.lambda_init}")
            _need(0 < mx.target_accuracy < 1, f"sft.mix_dpo.target_accuracy must be in (0, 1), got {mx.target_accuracy}")
            _need(0 < mx.lambda_min <= mx.lambda_max, "sft.mix_dpo needs 0 < lambda_min <= lambda_max, got "
                  f"{mx.lambda_min} and {mx.lambda_max}")
            _need(mx.batch_size >= 0, f"sft.mix_dpo.batch_size must be >= 0, got {mx.batch_size}")
    if command in ("dpo", "pipeline"):
        dp = cfg.dpo
        _need(dp.rejected in DPO_REJECTED, f"dpo.rejected must be one of {', '.join(DPO_REJECTED)}, got {dp.rejected!r}")
        _need(dp.rejected_batch_size >= 1, f"dpo.rejected_batch_size must be >= 1, got {dp.rejected_batch_size}")
        _need(_finite(dp.sft_weight) and dp.sft_weight >= 0, f"dpo.sft_weight must be >= 0, got {dp.sft_weight}")
        _need(dp.reference != "base" or command == "pipeline",
              "dpo.reference=base needs the pipeline's base model: use the pipeline command, 'start' or a model path")
    check_losses(cfg, command)


def _check_optim(phase: str, c, world_size: int) -> None:
    from .trainer import micro_batch_size

    _need(c.steps >= (0 if phase == "pretrain" else 1), f"{phase}.steps must be >= 1, got {c.steps}")
    _need(_finite(c.lr) and c.lr > 0, f"{phase}.lr must be a finite number > 0, got {c.lr}")
    _need(c.batch_size >= 1, f"{phase}.batch_size must be >= 1, got {c.batch_size}")
    _need(c.micro_batch_size >= 0, f"{phase}.micro_batch_size must be >= 0 (0 = the whole per-process batch), "
          f"got {c.micro_batch_size}")
    try:
        micro_batch_size(c, world_size)
    except ValueError as err:
        raise ConfigError(f"{phase}: {err}") from None
    _need(c.warmup_steps >= 0, f"{phase}.warmup_steps must be >= 0, got {c.warmup_steps}")
    _need(c.scheduler in SCHEDULERS, f"{phase}.scheduler must be one of {', '.join(SCHEDULERS)}, got {c.scheduler!r}")
    _need(0 <= c.min_lr_ratio <= 1, f"{phase}.min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}")
    _need(c.weight_decay >= 0, f"{phase}.weight_decay must be >= 0, got {c.weight_decay}")
    for k in ("adam_beta1", "adam_beta2"):
        _need(0 <= getattr(c, k) < 1, f"{phase}.{k} must be in [0, 1), got {getattr(c, k)}")
    _need(c.max_grad_norm >= 0, f"{phase}.max_grad_norm must be >= 0 (0 = no clipping), got {c.max_grad_norm}")
    _need(c.log_every >= 1, f"{phase}.log_every must be >= 1, got {c.log_every}")
    for k in ("eval_every", "save_every", "keep_checkpoints"):
        _need(getattr(c, k) >= 0, f"{phase}.{k} must be >= 0, got {getattr(c, k)}")


def check_losses(cfg: RunConfig, command: str) -> None:
    """Build the loss specs of the configured options (:meth:`SFTConfig.loss_spec`,
    :attr:`DPOConfig.spec`): the library's own checks decide (unknown divergence, beta, level,
    values, DPO loss type, ...), and name the section."""
    checks = []
    if command in ("sft", "pipeline"):
        checks.append(("sft", cfg.sft.loss_spec))
        if cfg.sft.mix_dpo.enabled:
            checks.append(("sft.mix_dpo", lambda: cfg.sft.mix_dpo.spec))
    if command in ("dpo", "pipeline"):
        checks.append(("dpo", lambda: cfg.dpo.spec))
    for where, build in checks:
        try:
            build()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}") from None


def check_backend(cfg: RunConfig) -> None:
    """A named ``backend`` exists, runs on the run's device and is available (may JIT-build it)."""
    if cfg.backend == "auto":
        return
    import torch

    import fdiv_kernels as fk

    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    h, w, y = torch.zeros(1, 2, device=device), torch.zeros(3, 2, device=device), torch.zeros(1, dtype=torch.long,
                                                                                           device=device)
    try:
        fk.token_stats(h, w, y, backend=cfg.backend)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"backend: {' '.join(str(err).split())}") from None


# ----------------------------------------------------------------------------------------------
# 2. paths
# ----------------------------------------------------------------------------------------------

def _check_deepspeed(cfg: RunConfig) -> None:
    """``cfg.deepspeed`` resolved to a readable JSON config, and the package installed."""
    cfg.deepspeed = resolve_config(cfg.deepspeed, what="deepspeed config")
    from .distributed import read_deepspeed_config

    try:
        read_deepspeed_config(cfg.deepspeed)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"deepspeed config {cfg.deepspeed}: {err}") from None
    import importlib.util

    _need(importlib.util.find_spec("deepspeed") is not None,
          "deepspeed is set but the deepspeed package is not installed: pip install 'fdiv-kernels[deepspeed]'")


def _check_model(m) -> Any:
    """``model.path`` a loadable model (directory or Hub id); the tokenizer it names (or
    ``model.tokenizer``), loaded."""
    if m.path:
        check_model(m.path, "model.path")
    if not (m.path or m.tokenizer):
        return None
    from ..hf import load_tokenizer

    tok_dir = m.tokenizer or m.path
    try:
        return load_tokenizer(tok_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {tok_dir!r}: {' '.join(str(err).split())[:300]}") from None


def check_paths(cfg: RunConfig, command: str) -> Prepared:
    """The DeepSpeed config, model and tokenizer directories, and every configured data file."""
    prep = Prepared()
    if cfg.deepspeed:
        _check_deepspeed(cfg)
    prep.tok = _check_model(cfg.model)
    if command in ("dpo", "pipeline") and cfg.dpo.reference not in ("start", "base"):
        check_model(cfg.dpo.reference, "dpo.reference")

    d = cfg.data
    phases = phases_of(cfg, command)
    wanted = [("eval_prompts", d.eval_prompts, load_sft), ("eval_pref", d.eval_pref, load_pref)]
    if "sft" in phases:
        wanted.append(("sft_train", d.sft_train, load_sft))
    if "dpo" in phases or cfg.sft.mix_dpo.enabled:
        wanted.append(("dpo_train", d.dpo_train, load_pref))
    for key, path, loader in wanted:
        if path and path not in prep.rows:
            try:
                prep.rows[path] = loader(path)
            except DataError as err:
                raise DataError(f"data.{key}: {err}") from None
    if "pretrain" in phases and d.pretrain:
        _need(os.path.isfile(d.pretrain) or bool(glob.glob(d.pretrain)),
              f"data.pretrain: {d.pretrain}: no such file")
    if "dpo" in phases and cfg.dpo.rejected == "self" and d.dpo_train:
        _need(checkable([{"messages": r["chosen"]} for r in prep.rows[d.dpo_train]]),
              f"dpo.rejected=self needs synthetic (automatically checkable) prompts; {d.dpo_train} has others "
              "(use dpo.rejected=data)")
    return prep


# ----------------------------------------------------------------------------------------------
# 3. the run directory
# ----------------------------------------------------------------------------------------------

def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``["sft.lr: 0.001 -> 0.002", ...]``: the keys (other than :data:`RESUME_FREE_KEYS`) that differ.

    A key the old configuration lacks (written by an earlier version) at its default value is no
    change: the old run used that default.
    """
    a, b = _flat(old), _flat(new)
    defaults = _flat(to_dict(RunConfig()))
    out = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in RESUME_FREE_KEYS or a.get(k) == b.get(k):
            continue
        if k not in a and k in defaults and b.get(k) == defaults[k]:
            continue
        out.append(f"{k}: {json.dumps(a.get(k, '<absent>'))} -> {json.dumps(b.get(k, '<absent>'))}")
    return out


def existing_run(run_dir: str) -> List[str]:
    """The :data:`RUN_MARKERS` present in ``run_dir`` (empty: no previous run there)."""
    if not os.path.isdir(run_dir):
        return []
    return [n for n in RUN_MARKERS if os.path.exists(os.path.join(run_dir, n))]


def _runs_beside(output_dir: str) -> str:
    """``"; runs in runs/: a, b"``: the runs a mistyped ``--name`` may have meant (empty: none)."""
    names = sorted(n for n in os.listdir(output_dir) if existing_run(os.path.join(output_dir, n))) \
        if os.path.isdir(output_dir) else []
    if not names:
        return ""
    return f"; runs in {output_dir}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"


def check_run_dir(cfg: RunConfig, *, resume: bool, overwrite: bool, allow_config_change: bool) -> List[str]:
    """Refuse to replace a run without ``overwrite``; refuse to resume a run that does not exist, or
    with another configuration without ``allow_config_change``. Returns the accepted configuration
    changes."""
    run_dir = os.path.join(cfg.output_dir, cfg.name)
    found = existing_run(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if found and not resume and not overwrite:
        state = "a finished run" if "summary.json" in found else "an unfinished run"
        raise RunDirectoryError(f"{run_dir} holds {state} ({', '.join(found)}); pass --resume to continue it, "
                                f"--overwrite to replace it, or --name to write a new run")
    if not resume:
        return []
    if not found:
        raise RunDirectoryError(f"--resume: nothing to resume in {run_dir} (no run there{_runs_beside(cfg.output_dir)}); "
                                "to start it, run the same command without --resume")
    saved = os.path.join(run_dir, "config.json")
    if not os.path.exists(saved):
        return []
    try:
        with open(saved, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError:
        raise ConfigError(f"{saved} is not valid JSON; cannot compare the configuration to resume") from None
    changes = config_changes(old, to_dict(cfg))
    if changes and not allow_config_change:
        shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
        raise ResumeMismatchError(f"--resume with a configuration that differs from {saved} ({shown}); run with "
                                  "the same settings, or pass --allow-config-change to continue with the new ones")
    return changes


# ----------------------------------------------------------------------------------------------

def preflight(cfg: RunConfig, command: str, *, resume: bool = False, overwrite: bool = False,
              allow_config_change: bool = False, world_size: Optional[int] = None,
              check_dir: bool = True) -> Prepared:
    """Every check above, in order; returns what they read for the run to reuse."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_values(cfg, command, world_size)
    prep = check_paths(cfg, command)
    if check_dir:
        prep.config_changes = check_run_dir(cfg, resume=resume, overwrite=overwrite,
                                            allow_config_change=allow_config_change)
    check_backend(cfg)
    return prep


__all__ = ["Prepared", "RUN_OUTPUTS", "check_paths", "check_run_dir", "check_values", "config_changes", "preflight"]
