"""``fdiv-train``: the reference SFT -> DPO trainer.

Usage::

    fdiv-train pipeline --config examples/configs/demo.yaml
    fdiv-train sft --config cfg.yaml --divergence js --beta 0.5 --lr 1e-4 --steps 200
    fdiv-train dpo --config cfg.yaml --model runs/x/sft/final --loss-type simpo --beta 2 --gamma 1
    fdiv-train sft --config cfg.yaml --mix-dpo            # App. D negative control
    fdiv-train pipeline --config cfg.yaml --resume         # continue a stopped run
    fdiv-train pipeline --config cfg.yaml --set sft.lr=5e-6 --set dpo.beta=0.01

Multi-process: ``torchrun --nproc_per_node 8 -m fdiv_kernels.train pipeline --config ...`` with
``--deepspeed examples/configs/zero3.json`` or ``--fsdp`` (or the ``deepspeed`` launcher, which
passes ``--local_rank``). See docs/trainer.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from .. import __version__
from .config import load_config
from ..errors import ConfigError, TrainingInterrupted

PHASE_FLAGS = (("lr", float, "peak learning rate"), ("steps", int, "optimizer steps"),
               ("beta", float, "beta of the SFT divergence / DPO loss"),
               ("batch_size", int, "global batch size (sequences or pairs)"))


def _local_rank_arg(p: argparse.ArgumentParser) -> None:
    # the deepspeed launcher passes it before the command (--module) or after it (a script);
    # SUPPRESS: a subcommand's default must not overwrite a value given before the command
    p.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank", default=argparse.SUPPRESS,
                   help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used otherwise")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdiv-train", description="Reference SFT -> DPO trainer on fdiv_kernels' fused losses.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _local_rank_arg(p)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("sft", "supervised fine-tuning with an f-divergence objective"),
                        ("dpo", "DPO / IPO / SimPO preference training"),
                        ("pipeline", "[pretrain ->] SFT -> DPO from the SFT checkpoint, with evaluations")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config file or shipped config name (demo, llama3_8b_dpo, ...)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set sft.lr=1e-4 (repeatable; values parsed as YAML)")
        s.add_argument("--name", help="run name (runs/<name>)")
        s.add_argument("--output", help="output directory holding run directories (default runs)")
        s.add_argument("--model", help="local Hugging Face model directory or Hub id, e.g. meta-llama/Meta-Llama-3-8B "
                                       "(default: the tiny built-in Llama)")
        s.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoints")
        s.add_argument("--overwrite", action="store_true", help="replace the run directory's previous run")
        s.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue even though the configuration differs from the run's")
        s.add_argument("--deepspeed", help="DeepSpeed JSON config file or shipped name (zero2, zero3)")
        s.add_argument("--fsdp", action="store_true", help="FSDP2 (torch fully_shard) across the processes")
        _local_rank_arg(s)
        s.add_argument("--divergence", help="SFT divergence (fk.DIVERGENCES name or alias)")
        s.add_argument("--level", choices=("token", "sequence"), help="SFT reward level")
        s.add_argument("--mix-dpo", action="store_true", help="SFT + lambda*DPO with adaptive lambda (App. D control)")
        s.add_argument("--loss-type", dest="loss_type",
                       help="DPO loss type (fk.DPO_LOSS_TYPES: sigmoid, ipo, simpo, robust, hinge, bco_pair, ...); "
                            "several with weights: --set dpo.loss_type=[sigmoid,bco_pair] --set dpo.loss_weights=[0.8,0.2]")
        s.add_argument("--gamma", type=float, help="SimPO target margin")
        s.add_argument("--seed", type=int)
        s.add_argument("--backend", help="fdiv_kernels token_stats backend (auto, torch, ...)")
        s.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
        s.add_argument("--report-to", metavar="tensorboard,wandb",
                       help="also log metrics to TensorBoard and/or Weights & Biases (comma-separated)")
        for flag, typ, h in PHASE_FLAGS:
            s.add_argument(f"--{flag.replace('_', '-')}", type=typ, dest=flag,
                           help=f"{h} of the phase ({name})" if name != "pipeline" else argparse.SUPPRESS)
    return p


def overrides_from_args(args: argparse.Namespace) -> List[str]:
    """The explicit flags as ``--set`` assignments (applied after the config's own ``--set``s)."""
    out = list(args.set)
    simple = {"name": "name", "output": "output_dir", "model": "model.path", "deepspeed": "deepspeed",
              "divergence": "sft.divergence", "level": "sft.level", "loss_type": "dpo.loss_type", "gamma": "dpo.gamma",
              "seed": "seed", "backend": "backend"}
    for attr, key in simple.items():
        v = getattr(args, attr)
        if v is not None:
            out.append(f"{key}={v}")
    if args.mix_dpo:
        out.append("sft.mix_dpo.enabled=true")
    if args.fsdp:
        out.append("fsdp.enabled=true")
    if args.no_progress:
        out.append("progress=false")
    if args.report_to is not None:
        names = [n.strip() for n in args.report_to.split(",") if n.strip() and n.strip() != "none"]
        out.append(f"report_to=[{', '.join(names)}]")
    for flag, _, _ in PHASE_FLAGS:
        v = getattr(args, flag)
        if v is None:
            continue
        if args.command == "pipeline":
            raise ConfigError(f"pipeline: --{flag.replace('_', '-')} is ambiguous; use "
                              f"--set sft.{flag}={v} or --set dpo.{flag}={v}")
        out.append(f"{args.command}.{flag}={v}")
    return out


def resume_command(argv: List[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume``."""
    args = [a for a in argv if a != "--overwrite"]
    return shlex.join(["fdiv-train"] + args + ([] if "--resume" in args else ["--resume"]))


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"fdiv-train: {msg}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done, 2 a configuration / data error (one line, nothing deleted or built),
    130 interrupted (a checkpoint was saved; the line names the command that resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "local_rank", None) is not None:  # the deepspeed launcher passes --local_rank=N
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        from .pipeline import run_command  # heavy imports after argument checking

        run_command(cfg, args.command, resume=args.resume, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change)
    except ConfigError as e:
        _say(f"error: {e}")
        return 2
    except TrainingInterrupted as e:
        _say(f"{e}; resume with: {resume_command([a for a in argv if not a.startswith('--local')])}")
        return 130
    except KeyboardInterrupt:
        _say("aborted (a second Ctrl-C): no checkpoint saved since the last one")
        return 130
    finally:
        if "torch.distributed" in sys.modules:
            from .distributed import cleanup

            cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
