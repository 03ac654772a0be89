"""Peak memory and time of one forward+backward: HF's own loss vs the patched fused loss.

Each variant runs in a fresh subprocess; peak memory is the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA) minus the value right before the step, so it counts
what the step itself allocates (activations, logits, gradients).

Run: ``python examples/hf_patch_memory.py --tiny`` (seconds) or, e.g.,
``python examples/hf_patch_memory.py --vocab 32000 --hidden 256 --batch 4 --seq 512``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv_kernels.integrations import transformers as fk_hf

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).to(dev)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    labels = ids.clone()
    labels[:, : args.seq // 10] = -100
    if args.mode == "fused":
        fk_hf.apply(model, divergence="sft", backend=args.backend)
    for _ in range(args.warmup):  # warm-up (JIT builds, allocator)
        model(input_ids=ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": args.mode, "loss": loss.item(), "seconds": time.perf_counter() - t, "peak_extra_mib": peak - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="fused backend: auto, torch, cpu, triton, ...")
    p.add_argument("--mode", choices=["hf", "fused"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.hidden, args.batch, args.seq = 2048, 64, 2, 64
    if args.mode is not None:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for mode in ("hf", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--vocab", str(args.vocab), "--hidden",
               str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
               "--warmup", str(args.warmup), "--device", args.device, "--backend", args.backend]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"B={args.batch} T={args.seq} V={args.vocab} H={args.hidden} layers={args.layers} device={args.device} "
          f"backend={args.backend} (fp32 logits alone: {logits_mib:.0f} MiB)")
    for r in rows:
        print(f"{r['mode']:>5}: loss {r['loss']:.6f}  time {r['seconds']:.3f} s  peak extra {r['peak_extra_mib']:.0f} MiB")
    if abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-4:
        raise RuntimeError("losses differ")
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
