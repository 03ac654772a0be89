"""A plain PyTorch training loop with the fused f-divergence loss as a two-line drop-in.

The usual loop::

    logits = model.head(model.body(x))                         # [B, T, V]: the big tensor
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), ignore_index=-100)

becomes (the two changed lines)::

    loss_fn = FusedLinearFDivLoss(divergence="js", beta=0.5, shift_labels=True)   # once
    loss = loss_fn(model.body(x), model.head, labels)                             # no [B, T, V] logits

Run: ``python examples/plain_pytorch.py --tiny --steps 5`` (CPU, seconds).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from fdiv_kernels.nn import FusedLinearFDivLoss


class TinyLM(nn.Module):
    """Embedding -> GRU -> LayerNorm (the "body"), then a bias-free linear head [V, H]."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def body(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.rnn(self.embed(ids))[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (V=128, H=32), seconds on CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--divergence", default="js")
    p.add_argument("--beta", type=float, default=None,
                   help="beta of the divergence (default 0.5; 1 for sft/tv, whose loss is then the plain NLL)")
    p.add_argument("--no-ref", action="store_true", help="no reference model (pi_ref = 1); implied by sft/tv")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    nll = args.divergence in ("sft", "tv")  # loss = -beta * mean log p: beta times the cross-entropy
    if args.beta is None:
        args.beta = 1.0 if nll else 0.5
    vocab, hidden, batch, seq = (128, 32, 8, 16) if args.tiny else (32000, 1024, 8, 512)
    torch.manual_seed(0)
    model = TinyLM(vocab, hidden).to(args.device)
    ref_model = TinyLM(vocab, hidden).to(args.device).eval()  # a frozen reference (pi_ref), for the anchor
    ref_model.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = FusedLinearFDivLoss(divergence=args.divergence, beta=args.beta, shift_labels=True)  # drop-in 1/2
    ref_stats = FusedLinearFDivLoss(shift_labels=True)  # only its per-token logp is used
    use_ref = not args.no_ref and not nll

    data = torch.randint(0, vocab, (64, seq), device=args.device)
    data[:, 1::2] = (data[:, 0::2] * 7 + 3) % vocab  # a learnable pattern: every odd token follows the previous one
    first = None
    for step in range(args.steps):
        x = data[torch.randint(0, data.shape[0], (batch,), device=args.device)]
        labels = x.clone()
        labels[:, : seq // 4] = -100  # unsupervised "prompt"
        ref = None
        if use_ref:  # per-token reference log-probs [B, T-1], from the same fused head
            with torch.no_grad():
                ref = ref_stats(ref_model.body(x), ref_model.head, labels, return_output=True).logp
        h = model.body(x)
        loss = loss_fn(h, model.head, labels, ref_logp=ref)  # drop-in 2/2
        if step == 0 and nll:
            naive = args.beta * F.cross_entropy(model.head(h)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                ignore_index=-100)
            print(f"check: fused {loss.item():.6f} vs naive cross-entropy {naive.item():.6f} (beta {args.beta} x)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        first = loss.item() if first is None else first
        print(f"step {step}: {args.divergence} loss {loss.item():.4f}")
    print(f"done: first loss {first:.4f}, last loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
