"""Two processes (torch.distributed, gloo, DDP) give the same losses and weights as one process
on the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fdiv_kernels.train.config import from_dict
from fdiv_kernels.train.pipeline import run_command


def _cfg(out, name, *, micro=0):
    return from_dict({
        "name": name, "output_dir": str(out), "backend": "torch", "progress": False, "seed": 5, "num_threads": 1,
        "model": {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "data": {"max_length": 32, "max_eval_pairs": 8,
                 "synthetic": {"n_sft": 32, "n_pref": 16, "n_eval": 8, "n_pretrain": 8}},
        "eval": {"task_accuracy": False},
        "sft": {"steps": 3, "batch_size": 8, "micro_batch_size": micro, "lr": 1e-2, "divergence": "js", "beta": 0.5,
                "eval_every": 0},
    })


def _worker(rank, world, port, out):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from fdiv_kernels.train.distributed import cleanup

    try:
        run_command(_cfg(out, "ddp"), "sft")
    finally:
        cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r.get("phase") == "sft"]


def test_two_gloo_processes_match_one_process(tmp_path):
    for k in ("RANK", "WORLD_SIZE"):
        assert os.environ.get(k) in (None, "1", "0"), "run this test outside torchrun"
    run_command(_cfg(tmp_path, "single"), "sft")
    run_command(_cfg(tmp_path, "accum", micro=2), "sft")  # 4 micro-batches of 2: same global batch
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    one, accum, two = (_losses(tmp_path / n) for n in ("single", "accum", "ddp"))
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5)
    assert accum == pytest.approx(one, rel=1e-5)
    wa = load_file(str(tmp_path / "single" / "sft" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "sft" / "final" / "model.safetensors"))
    w0 = load_file(str(tmp_path / "ddp" / "sft" / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(wb[k], w0[k]) for k in wb)  # final = last checkpoint
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
