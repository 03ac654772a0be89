"""Run configuration: nested dataclasses, loaded from YAML and overridden from the command line.

A config file mirrors :class:`RunConfig` (see ``docs/trainer.md`` for every key)::

    name: demo
    model: {tiny: {hidden_size: 128}}
    sft: {steps: 200, lr: 1e-3, divergence: js, beta: 0.5}

Overrides use dotted keys with YAML values: ``--set sft.lr=1e-4 --set dpo.loss_type=ipo``. Unknown
keys, wrongly typed values and broken YAML raise :class:`~fdiv_kernels.train.errors.ConfigError`
(a ``ValueError``) naming the key or the file position; the values themselves are checked by
:mod:`fdiv_kernels.train.validate` before a run starts.

Named configs: every file of ``examples/configs`` ships inside the package
(``fdiv_kernels/train/configs``), so ``--config demo`` and ``--deepspeed zero3`` work from an
installed wheel (:func:`resolve_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from ..specs import DPOSpec, FDivSpec
from ..errors import ConfigError

#: the fields of :class:`fdiv_kernels.specs.FDivSpec` that ``sft.*`` holds (flat in the YAML); the
#: reduction is the trainer's (a sum over the step's tokens, or a mean)
SFT_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(FDivSpec) if f.name != "reduction")


@dataclass
class TinyModelConfig:
    """The default model: a small Llama built from a ``LlamaConfig`` (no download)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    """``path``: a local Hugging Face model directory or a Hub id (``meta-llama/Meta-Llama-3-8B``)
    (AutoModelForCausalLM); ``None`` builds the tiny model and the character tokenizer.
    ``tokenizer``: tokenizer directory or Hub id (default: ``path``). ``dtype``: float32 |
    bfloat16 | float16 (weights and compute)."""

    path: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticConfig:
    """The built-in synthetic data set (used for every data path left empty)."""

    tasks: List[str] = field(default_factory=lambda: ["add", "reverse", "sort", "count"])
    n_pretrain: int = 20000
    n_sft: int = 4000
    n_pref: int = 3000
    n_eval: int = 200
    pretrain_noise: float = 0.3
    seed: int = 0


@dataclass
class DataConfig:
    """Data sets: JSONL (``.jsonl``/``.json``) or parquet files (a directory of them, a glob), or
    ``datasets`` data sets: a ``save_to_disk`` directory, a local data set folder or a Hugging
    Face Hub id, with ``:split`` (``HuggingFaceH4/ultrachat_200k:train_sft``; :mod:`.data`).

    ``sft_train``/``eval_prompts``: UltraChat-200K schema; ``dpo_train``/``eval_pref``:
    UltraFeedback-binarized schema; ``pretrain``: plain text. Empty paths use the synthetic set.
    ``max_length``: tokens per sequence (right truncation); ``eval_prompts``' answers are graded
    with the synthetic checker when ``eval_task_accuracy`` is on.
    """

    sft_train: Optional[str] = None
    dpo_train: Optional[str] = None
    eval_pref: Optional[str] = None
    eval_prompts: Optional[str] = None
    pretrain: Optional[str] = None
    max_length: int = 64
    max_eval_pairs: int = 256
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    """Common optimisation settings of a phase (AdamW, warmup + schedule, clipping)."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32          # global batch (sequences or pairs) per optimizer step
    micro_batch_size: int = 0     # per process per forward; 0 = batch_size / world_size
    warmup_steps: int = 0
    scheduler: str = "cosine"     # cosine | linear | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    log_every: int = 1
    eval_every: int = 50          # implicit-reward alignment on held-out pairs
    save_every: int = 0           # 0 = only at the end
    keep_checkpoints: int = 2


@dataclass
class PretrainConfig(OptimConfig):
    """Optional phase 0: next-token pretraining of the tiny base on ``data.pretrain`` text."""

    steps: int = 0
    seq_length: int = 64


@dataclass
class MixDPOConfig:
    """App. D negative control: SFT loss + lambda * DPO loss (sigmoid, ``beta``), lambda adapted
    PPO-style (halved when the batch DPO accuracy is above ``target_accuracy``, doubled below)."""

    enabled: bool = False
    lambda_init: float = 1.0
    target_accuracy: float = 0.7
    lambda_min: float = 1e-3
    lambda_max: float = 1e3
    beta: float = 0.1
    batch_size: int = 0           # pairs per step; 0 = sft batch size

    @property
    def spec(self) -> DPOSpec:
        """The validated :class:`~fdiv_kernels.specs.DPOSpec` of the mixed-in DPO term."""
        return DPOSpec(loss_type="sigmoid", beta=self.beta)


@dataclass
class SFTConfig(OptimConfig):
    """SFT with any registered divergence (``fk.loss``).

    ``divergence``, ``beta``, ``level``, ``values``, ``z_loss``, ``length_normalize``,
    ``label_smoothing``: the fields of
    :class:`fdiv_kernels.specs.FDivSpec` (:data:`SFT_LOSS_FIELDS`, with its defaults), flat in the
    YAML; :meth:`loss_spec` builds the spec, which is the one place they are validated.
    ``reference``: ``auto`` (the start model for every divergence except plain ``tv``/``sft``),
    ``start`` (always), ``none``.
    """

    divergence: str = FDivSpec.divergence
    beta: float = FDivSpec.beta
    level: str = FDivSpec.level
    values: str = FDivSpec.values
    z_loss: float = FDivSpec.z_loss
    length_normalize: bool = FDivSpec.length_normalize
    label_smoothing: float = FDivSpec.label_smoothing
    reference: str = "auto"
    mix_dpo: MixDPOConfig = field(default_factory=MixDPOConfig)

    def loss_spec(self, reduction: str = "mean") -> FDivSpec:
        """The validated :class:`~fdiv_kernels.specs.FDivSpec` of these options (``ValueError`` naming
        the bad one)."""
        return FDivSpec(**{k: getattr(self, k) for k in SFT_LOSS_FIELDS}, reduction=reduction)


@dataclass
class DPOConfig(OptimConfig):
    """DPO-family training (:class:`fdiv_kernels.nn.FusedLinearDPOLoss`); ``loss_type`` (a name of
    ``fk.DPO_LOSS_TYPES`` or a list, TRL's ``loss_type=[...]``), ``loss_weights`` (TRL's; one per
    type), ``beta``, ``gamma``, ``label_smoothing`` and ``discopop_tau`` make its :attr:`spec` (which
    decides, e.g., that ipo and simpo use length-averaged log-probs and that simpo needs no
    reference).

    ``reference``: ``start`` (the model DPO starts from), ``base`` (the pipeline's SFT start
    model) or a local model path or Hub id. ``rejected``: ``data`` (rejected answers as given) or
    ``self`` (the start model's own wrong greedy answers where it has one, else the data's;
    synthetic tasks only). ``sft_weight``: the NLL term on the chosen answers (RPO; TRL's ``"sft"``
    loss type with this weight), computed in the same fused pass over the step's chosen tokens.
    """

    steps: int = 100
    lr: float = 1e-4
    beta: float = 0.1
    loss_type: Union[str, List[str]] = "sigmoid"
    loss_weights: Optional[List[float]] = None
    gamma: float = 0.0
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reference: str = "start"
    rejected: str = "data"
    rejected_batch_size: int = 100  # rejected=self: generation batch (eval.batch_size when that is larger)
    sft_weight: float = 0.0

    @property
    def spec(self) -> DPOSpec:
        """The validated :class:`~fdiv_kernels.specs.DPOSpec` (``ValueError`` naming the bad option),
        with the ``sft`` term of weight ``sft_weight`` when it is > 0."""
        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if "sft" in names:
            raise ValueError("loss_type 'sft' (the NLL of the chosen answers) is dpo.sft_weight in the trainer")
        weights = None if self.loss_weights is None else list(self.loss_weights)
        if self.sft_weight > 0:
            weights = (weights if weights is not None else [1.0] * len(names)) + [self.sft_weight]
            names = names + ["sft"]
        return DPOSpec(loss_type=tuple(names), loss_weights=None if weights is None else tuple(weights), beta=self.beta,
                       label_smoothing=self.label_smoothing, gamma=self.gamma, discopop_tau=self.discopop_tau)


@dataclass
class EvalConfig:
    """Greedy-generation task accuracy on held-out prompts (``num_prompts``, generated
    ``batch_size`` at a time), and the periodic evaluation of a phase: the alignment metric on
    ``data.max_eval_pairs`` held-out pairs (``align_batch_size`` pairs per forward; a sigmoid DPO
    loss with the DPO phase's beta, or ``align_beta`` when the phase's loss_type is not sigmoid) and
    ``kl_ref_heldout`` on the first ``kl_prompts`` held-out answers (``kl_batch_size`` per forward)."""

    task_accuracy: bool = True
    num_prompts: int = 200
    max_new_tokens: int = 12
    batch_size: int = 100
    align_batch_size: int = 64
    align_beta: float = 0.1
    kl_prompts: int = 128
    kl_batch_size: int = 64


@dataclass
class FSDPConfig:
    """FSDP2 (torch ``fully_shard``, ``--fsdp``), an alternative to ``deepspeed``.

    ``checkpoint``: ``full`` (checkpoints hold the gathered weights in safetensors and the
    optimizer state gathered on rank 0) or ``sharded`` (every rank writes its shards with
    ``torch.distributed.checkpoint`` to ``<phase>/fsdp/step-<k>``; ``final/`` is always full).
    ``mixed_precision``: null (compute in the weights' dtype) or ``bfloat16``/``float16`` (the
    forward/backward dtype; fp32 weights, optimizer and gradient reductions).
    ``reshard_after_forward``: free each block's gathered weights after its forward (ZeRO-3-like
    memory) or keep them for the backward (ZeRO-2-like traffic).
    """

    enabled: bool = False
    checkpoint: str = "full"
    mixed_precision: Optional[str] = None
    reshard_after_forward: bool = True


@dataclass
class RunConfig:
    """Everything a run needs; ``output_dir/name`` holds metrics, plots, checkpoints, summary."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    backend: str = "auto"         # fdiv_kernels token_stats backend
    deepspeed: Optional[str] = None
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    num_threads: int = 0          # torch.set_num_threads when > 0
    progress: bool = True
    report_to: List[str] = field(default_factory=list)   # tensorboard, wandb (reporting.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


def _convert(cls, value: Any, key: str):
    """Build dataclass ``cls`` from a mapping, checking keys and scalar types."""
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key or '<root>'!r} must be a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in value.items():
        path = f"{key}.{k}" if key else k
        if k not in fields:
            raise ConfigError(f"unknown config key {path!r}; known under {key or '<root>'}: {', '.join(fields)}")
        default = getattr(cls(), k)
        if dataclasses.is_dataclass(default):
            kwargs[k] = _convert(type(default), v, path)
        else:
            kwargs[k] = _check_scalar(path, default, v, fields[k].type)
    return cls(**kwargs)


def _check_scalar(path: str, default: Any, v: Any, annotation: Any):
    kind = str(annotation)
    if v is None:
        if "Optional" in kind:
            return None
        raise ConfigError(f"config key {path!r} may not be null")
    if "List" in kind:  # the elements are the spec's to check (e.g. dpo.loss_type, dpo.loss_weights)
        if isinstance(v, str) and "Union[str" in kind:
            return v
        return _typed(path, v, list, "a list")
    if isinstance(default, bool) or "bool" in kind:
        return _typed(path, v, bool, "true/false")
    if "float" in kind or isinstance(default, float):
        return _number(path, v)
    if "int" in kind or isinstance(default, int):
        return _typed(path, v, int, "an integer")
    return _typed(path, v, str, "a string")


def _typed(path: str, v: Any, typ: type, what: str):
    """``v`` when it is a ``typ`` (a bool is no integer), else a ConfigError naming the key."""
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ConfigError(f"config key {path!r} must be {what}, got {v!r}")
    return v


def _number(path: str, v: Any) -> float:
    """A float from a number or a numeric string (YAML reads ``1e-3`` as a string)."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"config key {path!r} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config key {path!r} must be a number, got {v!r}")
    return float(v)


def from_dict(d: Dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a (possibly partial) nested mapping."""
    return _convert(RunConfig, copy.deepcopy(d) if isinstance(d, dict) else d, "")


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def set_dotted(d: Dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested mapping ``d`` in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() != "" else None


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_config_dirs() -> List[str]:
    """Where named configs live: the package (wheels) and a source checkout's ``examples/configs``."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, "configs"), os.path.normpath(os.path.join(here, "..", "..", "examples", "configs"))]


def shipped_configs() -> List[str]:
    """Names of the shipped configs (``demo.yaml``, ``zero3.json``, ...)."""
    return sorted({f for d in shipped_config_dirs() if os.path.isdir(d) for f in os.listdir(d)
                   if f.endswith(CONFIG_SUFFIXES)})


def resolve_config(path_or_name: str, *, what: str = "config") -> str:
    """An existing file path as is; otherwise a shipped config by name (``demo``, ``demo.yaml``,
    ``zero3``). :class:`ConfigError` when neither exists."""
    if os.path.isfile(path_or_name):
        return path_or_name
    if os.sep not in path_or_name and "/" not in path_or_name:
        for d in shipped_config_dirs():
            for suffix in ("",) + CONFIG_SUFFIXES:
                cand = os.path.join(d, path_or_name + suffix)
                if os.path.isfile(cand):
                    return cand
    raise ConfigError(f"{what} {path_or_name!r}: no such file, and no shipped config of that name "
                      f"(shipped: {', '.join(os.path.splitext(n)[0] for n in shipped_configs()) or 'none'})")


def read_yaml(path: str) -> Any:
    """The YAML document at ``path``; :class:`ConfigError` (``file:line:column: problem``) if broken."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None


def load_config(path: Optional[str], overrides: List[str] = ()) -> RunConfig:
    """Read a YAML file or shipped config (defaults when ``path`` is None) and apply overrides."""
    d: Dict[str, Any] = {}
    if path:
        path = resolve_config(path)
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
    for a in overrides:
        try:
            set_dotted(d, a)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {a}: invalid YAML value ({' '.join(str(e).split())})") from None
    return from_dict(d)

