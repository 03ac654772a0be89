"""Benchmark shapes per profile.

* ``cpu`` (``make bench``): sized so that the whole run stays under 10 minutes on 2 cores
  (a 4096 x 1024 x 32000 fp32 GEMM alone takes about 4 s there, so the design doc's shapes A and
  B are scaled down in tokens; H and V are kept).
* ``gpu`` (``make bench-gpu``): Llama-3-8B head (N=8192, H=4096, V=128256, bf16) and the CCE
  paper's Gemma-2 shape (N=8192, H=2304, V=256000, bf16).
* ``tiny``: seconds, for the smoke test and for debugging the suite.

Each entry: ``(label, n_tokens, hidden, vocab, dtype[, seq[, modes]])``: ``seq`` = tokens per row
(row suites; 0 = flat batch), ``modes`` overrides the suite's ``<suite>_modes`` for that entry.
``rounds``: timed rounds per case (after one warm-up / correctness call).
"""

from __future__ import annotations

PROFILES = {
    "cpu": {
        "rounds": 2,
        "ce": [
            ("A/4 (design A, N/4)", 1024, 1024, 32000, "fp32"),
            ("B/4 (design B, N/4)", 2048, 256, 32000, "fp32"),
            ("A/4 bf16", 1024, 1024, 32000, "bf16", 0, ("fwdbwd",)),
            ("B/4 bf16", 2048, 256, 32000, "bf16", 0, ("fwdbwd",)),
        ],
        "ce_modes": ("fwd", "fwdbwd"),
        "div": [("4x64 tok", 256, 256, 32000, "fp32", 64)],
        "div_modes": ("fwdbwd",),
        "dpo": [("2x2x256 tok", 1024, 256, 32000, "fp32", 256)],
        "dpo_modes": ("fwdbwd",),
        "scaling_tokens": {"h": 32, "v": 32000, "n": (1024, 2048, 4096, 8192, 16384, 32768),
                           "naive_max_logit_bytes": 1 << 30},
        "scaling_vocab": {"h": 32, "n": 1024, "v": (32000, 64000, 128000, 256000),
                          "naive_max_logit_bytes": 1 << 30},
    },
    "gpu": {
        "rounds": 10,
        "ce": [
            ("Llama-3-8B head", 8192, 4096, 128256, "bf16"),
            ("Gemma-2 (CCE paper)", 8192, 2304, 256000, "bf16"),
        ],
        "ce_modes": ("fwd", "fwdbwd"),
        "div": [("8x1024 tok", 8192, 4096, 128256, "bf16", 1024)],
        "div_modes": ("fwdbwd",),
        "dpo": [("4x2x1024 tok", 8192, 4096, 128256, "bf16", 1024)],
        "dpo_modes": ("fwdbwd",),
        "scaling_tokens": {"h": 4096, "v": 128256, "n": (1024, 2048, 4096, 8192, 16384, 32768),
                           "naive_max_logit_bytes": 12 << 30},
        "scaling_vocab": {"h": 4096, "n": 8192, "v": (32000, 64000, 128256, 256000),
                          "naive_max_logit_bytes": 12 << 30},
    },
    "tiny": {
        "rounds": 1,
        "ce": [("tiny", 256, 64, 2048, "fp32")],
        "ce_modes": ("fwd", "fwdbwd"),
        "div": [("tiny rows", 256, 64, 2048, "fp32", 64)],
        "div_modes": ("fwdbwd",),
        "dpo": [("tiny pairs", 256, 64, 2048, "fp32", 64)],
        "dpo_modes": ("fwdbwd",),
        "scaling_tokens": {"h": 32, "v": 2048, "n": (256, 512), "naive_max_logit_bytes": 1 << 30},
        "scaling_vocab": {"h": 32, "n": 256, "v": (2048, 4096), "naive_max_logit_bytes": 1 << 30},
    },
}
