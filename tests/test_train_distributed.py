"""Two processes (torch.distributed, gloo, CPU) give the losses and weights of one process.

* DDP, SFT: one process = 4 micro-batches = 2 gloo processes.
* The SFT -> DPO pipeline under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (full and sharded
  checkpoints), fp32, against one plain process of the same config: every logged loss, the
  final weights of both phases (which load with ``AutoModelForCausalLM``), and an exact
  mid-phase resume (the run's step-3 results removed, resumed from its step-2 checkpoint: the
  state a crash right after that checkpoint leaves). The DeepSpeed configs are the shipped
  ``examples/configs/zero{2,3}.json`` with bf16 turned off.
"""

import importlib.util
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fdiv_kernels.train.pipeline import run_command
from train_configs import tiny_run

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")


def _cfg(out, name, *, micro=0):
    return tiny_run(out, name, sft={"steps": 3, "batch_size": 8, "micro_batch_size": micro, "lr": 1e-2,
                                    "divergence": "js", "beta": 0.5, "eval_every": 0})


def _pipeline_cfg(out, name, **extra):
    """SFT then DPO with its NLL term (``sft_weight``), 2 micro-batches per process per step on 2
    processes, evaluations under the engine, a checkpoint every step of which the newest 2 are kept
    (engine folders pruned with them)."""
    phase = {"steps": 3, "batch_size": 8, "micro_batch_size": 2, "lr": 2e-3, "eval_every": 2, "save_every": 1,
             "keep_checkpoints": 2, "warmup_steps": 1}
    return tiny_run(out, name, layers=2, sft={**phase, "divergence": "js", "beta": 0.5},
                    dpo={**phase, "beta": 0.1, "rejected": "data", "sft_weight": 0.5}, **extra)


def _fp32_deepspeed(stage, out_dir):
    """An fp32 copy of the shipped ZeRO config, written atomically (both ranks write it)."""
    with open(os.path.join(CONFIGS, f"zero{stage}.json")) as f:
        cfg = json.load(f)
    cfg["bf16"]["enabled"] = False
    path = os.path.join(out_dir, f"zero{stage}_fp32.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f)
    os.replace(tmp, path)
    return path


def _engine_settings(engine, out_dir):
    if engine in ("zero2", "zero3"):
        return {"deepspeed": _fp32_deepspeed(int(engine[-1]), out_dir)}
    return {"ddp": {}, "zero3-bf16": {"deepspeed": os.path.join(CONFIGS, "zero3.json")},
            "fsdp": {"fsdp": {"enabled": True}},
            "fsdp-sharded": {"fsdp": {"enabled": True, "checkpoint": "sharded"}}}[engine]


def _env(rank, world, port, ext_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
                       "TORCH_EXTENSIONS_DIR": ext_dir})


ENGINES = ["ddp", "zero2", "zero3", "fsdp", "fsdp-sharded"]
BF16 = ["zero3-bf16"]  # the shipped zero3.json as is: resume only (bf16 is not comparable to fp32)
SHARD_DIRS = {"ddp": None, "zero2": "deepspeed", "zero3": "deepspeed", "fsdp": None, "fsdp-sharded": "fsdp",
              "zero3-bf16": "deepspeed"}


def _drop_last_step(run_dir, phase, subdir):
    """Remove what step 3 of ``phase`` wrote: the state a crash right after the step-2 checkpoint leaves."""
    d = os.path.join(run_dir, phase)
    for p in ("final", "checkpoint-3", os.path.join(subdir, "step-3") if subdir else None):
        if p and os.path.exists(os.path.join(d, p)):
            shutil.rmtree(os.path.join(d, p))
    os.remove(os.path.join(run_dir, "summary.json"))


def _worker(rank, world, port, out, engines):
    """Every 2-rank job in one pair of processes (imports and process-group start-up paid once):
    the DDP SFT run, then per engine an uninterrupted pipeline and its resumed copy."""
    _env(rank, world, port, os.path.join(out, "ext"))
    from fdiv_kernels.train.distributed import barrier, cleanup

    try:
        _exact_log_mean_exp_accumulation(rank, out)
        _patched_model_under_fsdp(rank, out)
        run_command(_cfg(out, "ddp-sft"), "sft")
        for engine in engines:
            cfg = _pipeline_cfg(out, engine, **_engine_settings(engine, out))
            run_command(cfg, "pipeline")
            run_dir = os.path.join(out, engine)
            if rank == 0:
                keep = os.path.join(out, f"{engine}-straight")
                shutil.copytree(os.path.join(run_dir, "dpo", "final"), os.path.join(keep, "dpo-final"))
                shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(keep, "metrics.jsonl"))
                _drop_last_step(run_dir, "dpo", SHARD_DIRS[engine])
            barrier()
            run_command(cfg, "pipeline", resume=True)
    finally:
        cleanup()


def _exact_log_mean_exp_accumulation(rank, out):
    """kl / squared_hellinger over 2 unequal micro-batches per rank under DDP (test_train_accumulate.py)."""
    from test_train_accumulate import two_rank_grads

    from fdiv_kernels.train.distributed import init_distributed

    init_distributed("cpu")
    got = two_rank_grads(rank)
    if rank == 0:
        torch.save(got, os.path.join(out, "lme_grads.pt"))


def _patched_model_under_fsdp(rank, out):
    """fk_hf.apply on a Llama sharded with FSDP2, the LM head in its own group (so the patched
    forward sees its DTensor weight): one step's gradients vs one process on both ranks' batches."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv_kernels.integrations import transformers as fk_hf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    ref = copy.deepcopy(model)
    batches = [torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    fk_hf.apply(model, divergence="js", beta=0.5)
    fk_hf.apply(ref, divergence="js", beta=0.5)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    model(input_ids=batches[rank], labels=batches[rank]).loss.backward()
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    (sum(ref(input_ids=b, labels=b).loss for b in batches) / 2).backward()  # FSDP2 averages over ranks
    if rank == 0:
        torch.save({"fsdp": got, "one": {n: p.grad for n, p in ref.named_parameters()}},
                   os.path.join(out, "fsdp_patch_grads.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path, phase):
    return [r for r in map(json.loads, open(path)) if r.get("phase") == phase]


def _losses(run_dir, phase="sft"):
    return [r["loss"] for r in _rows(os.path.join(run_dir, "metrics.jsonl"), phase) if "loss" in r]


def _weights(d):
    return load_file(os.path.join(str(d), "model.safetensors"))


def _assert_weights_close(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every 2-rank job once (see :func:`_worker`); the tests below check their outputs."""
    for k in ("RANK", "WORLD_SIZE"):
        assert os.environ.get(k) in (None, "1", "0"), "run this test outside torchrun"
    out = tmp_path_factory.mktemp("two_ranks")
    engines = [e for e in ENGINES + BF16 if not e.startswith("zero") or importlib.util.find_spec("deepspeed")]
    mp.start_processes(_worker, args=(2, _free_port(), str(out), engines), nprocs=2, join=True, start_method="spawn")
    return out


def test_two_gloo_processes_match_one_process(two_ranks, tmp_path):
    run_command(_cfg(tmp_path, "single"), "sft")
    run_command(_cfg(tmp_path, "accum", micro=2), "sft")  # 4 micro-batches of 2: same global batch

    one, accum, two = (_losses(d / n) for d, n in ((tmp_path, "single"), (tmp_path, "accum"), (two_ranks, "ddp-sft")))
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5)
    assert accum == pytest.approx(one, rel=1e-5)
    wa = _weights(tmp_path / "single" / "sft" / "final")
    wb = _weights(two_ranks / "ddp-sft" / "sft" / "final")
    w0 = _weights(two_ranks / "ddp-sft" / "sft" / "checkpoint-3")
    assert all(torch.equal(wb[k], w0[k]) for k in wb)  # final = last checkpoint
    _assert_weights_close(wa, wb, atol=1e-6)


def test_log_mean_exp_accumulates_exactly_over_two_ranks(two_ranks):
    """Two gloo processes, two unequal micro-batches each: the DDP step's ``.grad`` and logged loss
    are those of the whole batch in one piece (kl, squared_hellinger; values, z_loss)."""
    from test_train_accumulate import check_two_rank_grads, float64_rms_norm

    with float64_rms_norm():
        check_two_rank_grads(torch.load(two_ranks / "lme_grads.pt", weights_only=True))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The pipeline in this (single) process: the reference every engine must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run_command(_pipeline_cfg(out, "single"), "pipeline")
    return out / "single"


@pytest.mark.parametrize("engine", ENGINES)
def test_pipeline_on_two_ranks_matches_one_process_and_resumes_exactly(engine, one_process, two_ranks):
    deepspeed = engine.startswith("zero")
    if deepspeed:
        pytest.importorskip("deepspeed")
    run = two_ranks / engine
    ref_metrics = str(one_process / "metrics.jsonl")
    straight = str(two_ranks / f"{engine}-straight" / "metrics.jsonl")
    for phase in ("sft", "dpo"):
        want = [r["loss"] for r in _rows(ref_metrics, phase) if "loss" in r]
        got = [r["loss"] for r in _rows(straight, phase) if "loss" in r]
        assert len(got) == len(want) == 3, phase
        assert got == pytest.approx(want, rel=2e-5, abs=1e-7), phase
        align_want = [r["align_accuracy"] for r in _rows(ref_metrics, phase) if "align_accuracy" in r]
        assert [r["align_accuracy"] for r in _rows(straight, phase) if "align_accuracy" in r] == align_want
    # the final weights of both phases: non-empty, complete, equal to one process's
    for phase in ("sft", "dpo"):
        _assert_weights_close(_weights(one_process / phase / "final"), _weights(run / phase / "final"))

    # the resumed run: DPO continued from checkpoint-2 and ended where the uninterrupted run did
    resumed = _rows(str(run / "metrics.jsonl"), "dpo")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx(
        [r["loss"] for r in _rows(straight, "dpo") if "loss" in r], rel=1e-6, abs=1e-8)
    _assert_weights_close(_weights(two_ranks / f"{engine}-straight" / "dpo-final"), _weights(run / "dpo" / "final"),
                          rtol=1e-6, atol=1e-8)
    summary = json.load(open(run / "summary.json"))
    assert summary["phases"]["sft"]["skipped"] and summary["phases"]["dpo"]["resumed_from"] == 2

    # keep_checkpoints=2 also prunes the engine's own step folders
    for phase in ("sft", "dpo"):
        assert sorted(os.listdir(run / phase)) == sorted(
            ["checkpoint-2", "checkpoint-3", "final"]
            + (["deepspeed"] if deepspeed else ["fsdp"] if engine == "fsdp-sharded" else []))
        if deepspeed or engine == "fsdp-sharded":
            sub = run / phase / ("deepspeed" if deepspeed else "fsdp")
            assert sorted(d for d in os.listdir(sub) if d.startswith("step-")) == ["step-2", "step-3"]
    if engine == "fsdp-sharded":
        assert not (run / "dpo" / "checkpoint-3" / "model.safetensors").exists()  # weights in the shards
    # the final model loads with transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run / "dpo" / "final"))
    sd = {k: v for k, v in model.state_dict().items() if k in _weights(run / "dpo" / "final")}
    _assert_weights_close(sd, _weights(one_process / "dpo" / "final"))
    # DeepSpeed never JIT-built its shared-memory all-reduce (2-3 minutes on 2 cores)
    ext = two_ranks / "ext"
    assert not ext.exists() or not any("shm" in d for d in os.listdir(ext))


def test_bf16_deepspeed_resume_is_exact(two_ranks):
    """ZeRO-3 bf16 (the shipped config): checkpoint-<k> holds the 16-bit weights, deepspeed/step-<k>
    the fp32 master weights and Adam moments; resuming restores both, so the resumed DPO phase
    reproduces the uninterrupted one bit for bit (losses and 16-bit final weights)."""
    pytest.importorskip("deepspeed")
    run, straight = two_ranks / "zero3-bf16", two_ranks / "zero3-bf16-straight"
    got = [r["loss"] for r in _rows(str(run / "metrics.jsonl"), "dpo") if "loss" in r]
    want = [r["loss"] for r in _rows(str(straight / "metrics.jsonl"), "dpo") if "loss" in r]
    assert len(got) == 3 and got == want
    assert json.load(open(run / "summary.json"))["phases"]["dpo"]["resumed_from"] == 2
    a, b = _weights(straight / "dpo-final"), _weights(run / "dpo" / "final")
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_patch_under_fsdp2_reduces_the_head_gradient(two_ranks):
    """A DTensor head weight gathered with full_tensor(): without Partial("avg") grad placements each
    rank kept its own unreduced slice of the gradient (the head trained on half the data)."""
    g = torch.load(str(two_ranks / "fsdp_patch_grads.pt"), weights_only=True)
    assert g["fsdp"].keys() == g["one"].keys() and "lm_head.weight" in g["fsdp"]
    for k in g["one"]:
        torch.testing.assert_close(g["fsdp"][k], g["one"][k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_ddp_wrapper_raises_no_future_warning(tmp_path):
    """wrap_ddp turns off the per-forward buffer broadcast with the flag this torch names
    (forward_sync_buffers; broadcast_buffers is deprecated with a FutureWarning in torch 2.13)."""
    import warnings

    import torch.distributed as dist

    from fdiv_kernels.train.distributed import DistInfo, wrap_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            # DistInfo as a 2-process run sees it (DDP itself only needs the group)
            ddp = wrap_ddp(torch.nn.Linear(2, 2), DistInfo(rank=0, world_size=2), torch.device("cpu"))
        assert not getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True))
    finally:
        dist.destroy_process_group()
