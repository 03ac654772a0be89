"""Exact gradient accumulation of the SFT losses over micro-batches (docs/math.md, "Gradient
accumulation of the log-mean-exp divergences"): the step's ``.grad`` after 1, 2 or 3 micro-batches
of unequal sizes, driven as the training loop drives them (:class:`~fdiv_kernels.train.accumulate.StepBackward`
on a :class:`~fdiv_kernels.train.engines.LocalEngine`), equals the gradient of the whole batch's loss
computed in one piece, in float64; so does the logged loss. (Two processes: test_train_distributed.py.)"""

import contextlib
import json
import math

import pytest
import torch
from train_batches import full_logp
from train_batches import sft_batch as _sft_batch

from fdiv_kernels.api import loss_from_spec
from fdiv_kernels.train import steps as S
from fdiv_kernels.train.accumulate import LogMeanExpLoss, StepBackward
from fdiv_kernels.train.config import OptimConfig, RunConfig, SFTConfig
from fdiv_kernels.train.distributed import DistInfo
from fdiv_kernels.train.engines import LocalEngine
from test_train_steps import _model

SPLITS = {1: [slice(0, 8)], 2: [slice(0, 3), slice(3, 8)], 3: [slice(0, 1), slice(1, 4), slice(4, 8)]}


def _rows(batch, s):
    return {k: v[s] for k, v in batch.items()}


def one_piece(model, batch, cfg, ref):
    """``(loss, grads)`` of the whole batch's loss in one ``fk`` call (``reduction="mean"``)."""
    x = S._inputs(model, batch, "torch")
    out = loss_from_spec(cfg.loss_spec(), x.hidden, x.weight, S.shifted(batch), ref_logp=ref, bias=x.bias,
                         head=x.head)
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads


def accumulated(model, pieces, refs, cfg, *, world_size=1, rank=0, counts=None, units=None):
    """``(logged loss, its log-mean-exp part)`` of one optimizer step's backward over ``pieces``, as the
    loop runs it (the linear part of the logged loss is this process's share)."""
    engine = LocalEngine(model, OptimConfig(), RunConfig(), DistInfo(rank=rank, world_size=world_size),
                         torch.device("cpu"), micro_batch_size=1, grad_accum=len(pieces), phase="sft")
    if counts is None:
        counts = {k: sum(S.sft_counts(p)[k] for p in pieces) for k in ("tokens", "rows")}
        units = sum(S.sft_units(p, cfg) for p in pieces)
    norm = S.Norm(units, len(pieces), world_size, counts)
    backward = StepBackward(engine, num_micro=len(pieces), world_size=world_size, device=torch.device("cpu"))
    logged = 0.0
    for i, (p, r) in enumerate(zip(pieces, refs)):
        with engine.micro_context(i, len(pieces)):
            loss, st = S.sft_micro(engine.module, p, cfg=cfg, ref_logp=r, norm=norm, backend="torch")
            backward(i, loss)
        logged += st["loss"][0]
    return logged + backward.log_mean_exp(), backward.log_mean_exp()


#: the two-process cases (test_train_distributed.py): rank 0 holds rows 0-2, rank 1 rows 3-7
DDP_CASES = [("kl", "token", "free", 0.05), ("squared_hellinger", "sequence", "detach", 0.0),
             ("kl", "sequence", "drop", 0.05)]
DDP_SPLITS = ([slice(0, 1), slice(1, 3)], [slice(3, 5), slice(5, 8)])


def two_rank_grads(rank: int) -> dict:
    """On each of 2 gloo processes: the step's DDP-averaged ``.grad`` of every :data:`DDP_CASES` case
    and its logged loss (counts all-reduced as the loop does)."""
    from fdiv_kernels.train.distributed import all_reduce_sum

    with float64_rms_norm():
        return _two_rank_grads(rank, all_reduce_sum)


def _two_rank_grads(rank, all_reduce_sum):
    m, batch, ref = _setup()
    out = {}
    for case in DDP_CASES:
        d, level, values, z = case
        cfg = SFTConfig(divergence=d, beta=0.7, level=level, values=values, z_loss=z)
        pieces = [_rows(batch, s) for s in DDP_SPLITS[rank]]
        local = [sum(S.sft_counts(p)[k] for p in pieces) for k in ("tokens", "rows")]
        units = sum(S.sft_units(p, cfg) for p in pieces)
        tot = all_reduce_sum([units, *local], torch.device("cpu"))
        logged, lme = accumulated(m, pieces, [ref[s] for s in DDP_SPLITS[rank]], cfg, world_size=2, rank=rank,
                                  counts={"tokens": tot[1], "rows": tot[2]}, units=tot[0])
        loss = all_reduce_sum([logged - lme], torch.device("cpu"))[0] + lme  # as the loop's reduce_stats
        out[case] = ([p.grad.detach().clone() for p in m.parameters()], loss)
        m.zero_grad(set_to_none=True)
    return out


def _setup():
    m, ref_m, batch = _model(0), _model(1), _sft_batch(8)
    return m, batch, S.reference_token_logp(ref_m, batch, backend="torch")


CASES = [(d, level, values, z) for d in ("kl", "squared_hellinger") for level in ("token", "sequence")
         for values in ("drop", "detach", "free") for z in (0.0, 0.05)]


def _rms_norm_in_input_dtype(self, h):
    """Llama's RMSNorm in the input's dtype (the original casts to float32)."""
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@contextlib.contextmanager
def float64_rms_norm():
    """Llama's RMSNorm computes in float32 even for a float64 model; its backward then rounds the
    incoming gradient to float32, at a scale that depends on each micro-batch's weight (~6e-8
    relative). Inside, it computes in the input dtype, so the comparison is float64 throughout."""
    from transformers.models.llama import modeling_llama

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        yield


@pytest.fixture(scope="module", autouse=True)
def float64_throughout():
    with float64_rms_norm():
        yield


@pytest.fixture(scope="module")
def setup(float64_throughout):
    return _setup()


@pytest.mark.parametrize("divergence,level,values,z_loss", CASES)
def test_log_mean_exp_accumulates_to_the_one_piece_gradient(setup, divergence, level, values, z_loss):
    m, batch, ref = setup
    cfg = SFTConfig(divergence=divergence, beta=0.7, level=level, values=values, z_loss=z_loss)
    want_loss, want = one_piece(m, batch, cfg, ref)
    for n, split in SPLITS.items():
        logged, _ = accumulated(m, [_rows(batch, s) for s in split], [ref[s] for s in split], cfg)
        assert logged == pytest.approx(want_loss, rel=1e-12, abs=1e-12), n
        for p, g in zip(m.parameters(), want):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=f"{n} micro-batches")
        m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("divergence,values,z_loss", [("pearson", "free", 0.05), ("js", "detach", 0.05),
                                                      ("tv", "free", 0.0)])
def test_means_with_linear_terms_accumulate_exactly_too(setup, divergence, values, z_loss):
    """Other divergences with ``values="free"`` / ``z_loss``: each term over its global count
    (tokens or rows), so the step no longer depends on how the batch is split."""
    m, batch, ref = setup
    cfg = SFTConfig(divergence=divergence, beta=0.7, values=values, z_loss=z_loss)
    want_loss, want = one_piece(m, batch, cfg, ref)
    logged, _ = accumulated(m, [_rows(batch, s) for s in SPLITS[3]], [ref[s] for s in SPLITS[3]], cfg)
    assert logged == pytest.approx(want_loss, rel=1e-12)
    for p, g in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    m.zero_grad(set_to_none=True)


def test_one_piece_kl_is_the_hand_formula(setup):
    """The one-piece reference itself, for KL at token level with ``values="free"`` and z-loss, against
    the model's full logits: ``log mean exp(-u - 1) + mean_rows V(s0) + z mean_tokens lse^2`` with
    ``u = beta (logp - ref) + V_t - V_next`` (plain autograd)."""
    m, batch, ref = setup
    cfg = SFTConfig(divergence="kl", beta=0.7, values="free", z_loss=0.05)
    want_loss, want = one_piece(m, batch, cfg, ref)
    logp, mask, logits = full_logp(m, batch)
    lse = torch.logsumexp(logits, -1)
    u_rows, v0 = [], []
    for r in range(mask.shape[0]):
        pos = mask[r].nonzero().flatten().tolist()
        if not pos:
            continue
        nxt = pos[1:] + pos[-1:]
        u_rows.append(0.7 * (logp[r, pos] - ref[r, pos]) + lse[r, pos] - lse[r, nxt])
        v0.append(lse[r, pos[0]])
    u = torch.cat(u_rows)
    hand = (torch.logsumexp(-u - 1, 0) - math.log(u.numel()) + torch.stack(v0).mean()
            + 0.05 * (lse[mask] ** 2).mean())
    hand.backward()
    assert float(hand.detach()) == pytest.approx(want_loss, rel=1e-12)
    for p, g in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    m.zero_grad(set_to_none=True)


def test_micro_batch_losses_of_log_mean_exp_divergences_are_parts(setup):
    """``kl`` returns the micro-batch's ``log sum psi`` (0 rows supervised: count 0), not a mean."""
    m, batch, ref = setup
    cfg = SFTConfig(divergence="kl", beta=0.7)
    loss, _ = S.sft_micro(m, _rows(batch, slice(0, 3)), cfg=cfg, ref_logp=ref[:3],
                          norm=S.Norm(S.sft_units(batch, cfg), 2, 1, S.sft_counts(batch)), backend="torch")
    assert isinstance(loss, LogMeanExpLoss)
    assert loss.count == S.sft_counts(_rows(batch, slice(0, 3)))["tokens"]
    assert loss.global_count == S.sft_counts(batch)["tokens"]


def check_two_rank_grads(got: dict) -> None:
    """The two processes' :func:`two_rank_grads` against the whole batch in one piece, here."""
    m, batch, ref = _setup()
    for case in DDP_CASES:
        d, level, values, z = case
        cfg = SFTConfig(divergence=d, beta=0.7, level=level, values=values, z_loss=z)
        want_loss, want = one_piece(m, batch, cfg, ref)
        grads, loss = got[case]
        assert loss == pytest.approx(want_loss, rel=1e-12), case
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=str(case))


@pytest.mark.parametrize("divergence", ["kl", "squared_hellinger"])
def test_sft_runs_do_not_depend_on_micro_batch_size(tmp_path, divergence):
    """The loop end to end (fp32): 1 micro-batch of 8 = 4 of 2 per step, logged losses and weights."""
    from safetensors.torch import load_file
    from train_configs import tiny_run

    from fdiv_kernels.train.pipeline import run_command

    sft = {"steps": 2, "batch_size": 8, "lr": 1e-2, "divergence": divergence, "beta": 0.5, "values": "free",
           "z_loss": 0.01, "eval_every": 0}
    runs = {mb: tiny_run(tmp_path, f"mb{mb}", sft={**sft, "micro_batch_size": mb}) for mb in (0, 2)}
    for cfg in runs.values():
        run_command(cfg, "sft")
    losses = {mb: [json.loads(line)["loss"] for line in open(tmp_path / f"mb{mb}" / "metrics.jsonl")
                   if '"loss"' in line] for mb in runs}
    assert len(losses[0]) == 2 and losses[2] == pytest.approx(losses[0], rel=1e-5)
    a, b = (load_file(str(tmp_path / f"mb{mb}" / "sft" / "final" / "model.safetensors")) for mb in runs)
    for k in a:  # fp32 after 2 steps at lr 1e-2: summation-order noise (the float64 tests above pin exactness)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_with_the_nll_term_accumulates_exactly(setup, loss_type):
    """DPO with ``sft_weight`` (the NLL of the chosen answers) over 1, 2 or 3 unequal micro-batches of
    pairs equals the whole batch in one piece, in float64: the NLL is divided by the step's global
    count of chosen tokens (it was each micro-batch's own count: the objective then depended on how
    the batch was split; 3e-3 apart at the first DPO step of a 2-rank ZeRO-3 pipeline)."""
    from train_batches import pair_batch

    from fdiv_kernels.train.config import DPOConfig

    m = setup[0]
    batch = pair_batch(3, seed=3)
    cfg = DPOConfig(loss_type=loss_type, beta=0.3, sft_weight=0.5)
    ref = S.reference_pair_logps(_model(1), batch, spec=cfg.spec, backend="torch")
    b = batch["input_ids"].shape[0] // 2
    results = {}
    for n, cuts in {1: [(0, 3)], 2: [(0, 1), (1, 3)], 3: [(0, 1), (1, 2), (2, 3)]}.items():
        pieces = [{k: torch.cat([v[lo:hi], v[b + lo:b + hi]]) for k, v in batch.items()} for lo, hi in cuts]
        refs = [torch.cat([ref[lo:hi], ref[b + lo:b + hi]]) for lo, hi in cuts]
        counts = {"chosen_tokens": sum(S.dpo_counts(p)["chosen_tokens"] for p in pieces)}
        norm = S.Norm(float(b), len(pieces), 1, counts)
        total = 0.0
        for p, r in zip(pieces, refs):
            loss, _ = S.dpo_micro(m, p, cfg=cfg, ref=r, norm=norm, backend="torch")
            loss.backward()
            total += float(loss.detach())
        results[n] = (total, [q.grad.detach().clone() for q in m.parameters()])
        m.zero_grad(set_to_none=True)
    for n in (2, 3):
        assert results[n][0] == pytest.approx(results[1][0], rel=1e-12), n
        for g, w in zip(results[n][1], results[1][1]):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=str(n))
