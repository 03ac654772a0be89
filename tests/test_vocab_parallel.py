"""Vocabulary-parallel fused losses (issue 27): a head split along the vocabulary across 2 and 3
gloo processes (CPU) gives the values and gradients of one process holding the whole head.

Three processes are spawned once for the module (:func:`ranks`); each runs every case on its
shard (:data:`RUNS`): its plain rows with ``vocab_group=`` (uneven shards: :data:`SIZES`) on a
2-rank group (ranks 0 and 1) and on the 3-rank world, and a ``DTensor`` placed ``Shard(0)`` on the
3-rank world (``torch.chunk``'s uneven sizes); the error cases, a group of one, ``torch.compile`` and the transformers
patch on a 2-rank ``ColwiseParallel`` head run there too. This process computes every case once
on the whole head and compares: float64 to 1e-12, float32 to float32 resolution. Chunks of a few
tokens (:data:`CHUNK_TOKENS`) make every one-pass call span several chunks, so the log-mean-exp
divergences are exact across ranks and chunks at once.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.multiprocessing as mp

import fdiv_kernels as fk
from fdiv_kernels.kernels import chunk_sizes

WORLD = 3
V, H = 37, 8
#: the vocab_group= form's shard sizes per group size (uneven; every rank's rows follow the previous rank's)
SIZES = {2: (21, 16), 3: (9, 17, 11)}
#: supervised tokens per one-pass chunk (of the largest shard): a call of 13-34 tokens spans 3-7 chunks
CHUNK_TOKENS = 5
RUNS = (("group", 2), ("group", 3), ("dtensor", 3))
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}


def _small_chunks() -> None:
    """Chunks of :data:`CHUNK_TOKENS` tokens on the torch (two-pass; one pass: float64) and cpu backends (for
    the largest shard)."""
    chunk_sizes.TWO_PASS_ELEMENTS = CHUNK_TOKENS * max(SIZES[2])
    chunk_sizes.CPU_SINGLE_PASS_ELEMENTS = CHUNK_TOKENS * max(SIZES[2])
    chunk_sizes.TORCH_SINGLE_PASS_BYTES = CHUNK_TOKENS * max(SIZES[2]) * 8  # float64 logits (float32: 10 tokens)


# ---------------------------------------------------------------------------------------------
# The head of one run: whole (one process), this rank's rows with vocab_group=, or a DTensor
# ---------------------------------------------------------------------------------------------

@dataclass
class Head:
    form: str = "full"
    world: int = 1
    rank: int = 0
    group: object = None
    mesh: object = None

    def rows(self) -> slice:
        if self.world == 1:
            return slice(0, V)
        sizes = SIZES[self.world] if self.form == "group" else [len(c) for c in torch.arange(V).chunk(self.world)]
        off = sum(sizes[:self.rank])
        return slice(off, off + sizes[self.rank])

    def param(self, full: Optional[torch.Tensor]):
        if full is None:
            return None
        if self.form == "full":
            return full.clone().requires_grad_()
        if self.form == "group":
            return full[self.rows()].clone().requires_grad_()
        from torch.distributed.tensor import Shard, distribute_tensor

        return torch.nn.Parameter(distribute_tensor(full.clone(), self.mesh, [Shard(0)]))

    @property
    def kwargs(self) -> dict:
        return {"vocab_group": self.group} if self.form == "group" else {}

    @staticmethod
    def grad(p) -> Optional[torch.Tensor]:
        if p is None or p.grad is None:
            return None
        return p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad


# ---------------------------------------------------------------------------------------------
# The cases: fn(h, w, b, y, ref, **vocab) -> (what to backpropagate or None, outputs)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    fn: Callable
    dtype: torch.dtype = torch.float64
    backend: str = "torch"
    bias: bool = False
    rows: int = 3
    length: int = 6
    masked_shard: bool = False  # a bias of -inf on rows 21.. (all of the 2-rank group's shard 1); labels < 21
    no_grad: bool = False


def _inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(case.rows, case.length, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(V, generator=g, dtype=torch.float64) if case.bias or case.masked_shard else None
    top = 21 if case.masked_shard else V
    y = torch.randint(0, top, (case.rows, case.length), generator=g)
    y[0, :2] = -100
    y[-1, -1] = -100
    if case.masked_shard:
        b[21:] = -float("inf")
    ref = -3 * torch.rand(case.rows, case.length, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(case.dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y, cast(ref)


def _weights(like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)


def fdiv(entropy_weight: float = 0.0, return_entropy: Optional[bool] = None, **options) -> Callable:
    """``fk.loss`` (plus ``entropy_weight * sum(entropy)``: the statistics outputs' gradients)."""
    ent = bool(entropy_weight) if return_entropy is None else return_entropy

    def fn(h, w, b, y, ref, backend, **vocab):
        out = fk.loss(h, w, y, bias=b, ref_logp=ref, beta=0.7, backend=backend, return_entropy=ent, **options,
                      **vocab)
        total = out.loss.sum()
        if entropy_weight:
            total = total + entropy_weight * out.entropy.sum()
        values = dict(loss=out.loss, logp=out.logp, lse=out.lse, reward=out.reward)
        if ent:
            values["entropy"] = out.entropy
        return total, values
    return fn


def primal(**options) -> Callable:
    def fn(h, w, b, y, ref, backend, **vocab):
        out = fk.primal_loss(h, w, y, bias=b, backend=backend, **options, **vocab)
        return out.loss.sum(), dict(loss=out.loss, logp=out.logp, lse=out.lse)
    return fn


def stats(entropy: bool) -> Callable:
    """``fk.token_stats`` under a function of the user's (the two-pass backward, entropy included)."""
    def fn(h, w, b, y, ref, backend, **vocab):
        st = fk.token_stats(h, w, y, bias=b, backend=backend, return_entropy=entropy, **vocab)
        total = (st.logp * _weights(st.logp, 1)).sum() + (st.lse * _weights(st.lse, 2)).sum()
        values = dict(logp=st.logp, lse=st.lse)
        if entropy:
            total = total + (st.entropy * _weights(st.entropy, 3)).sum()
            values["entropy"] = st.entropy
        return total, values
    return fn


def seq_logp(h, w, b, y, ref, backend, **vocab):
    s = fk.sequence_logp(h, w, y, bias=b, backend=backend, **vocab)
    return s.sum.sum() + 2 * s.mean.sum(), dict(sum=s.sum, mean=s.mean)


def dpo(reference: str, **options) -> Callable:
    """``fk.nn.FusedLinearDPOLoss`` on ``[2B, T]`` rows, with reference log-probs or the reference's
    hidden states through the same (sharded) head."""
    def fn(h, w, b, y, ref, backend, **vocab):
        loss_fn = fk.nn.FusedLinearDPOLoss(beta=0.3, backend=backend, **options, **vocab)
        kw = dict(ref_logp=ref.sum(dim=1)) if reference == "logp" else dict(ref_hidden=0.9 * h.detach())
        out = loss_fn(h, w, y, bias=b, return_output=True, **kw)
        return out.loss, dict(loss=out.loss, losses=out.losses, chosen=out.chosen_rewards,
                              rejected=out.rejected_rewards)
    return fn


def two_pass(inner: Callable) -> Callable:
    def fn(*args, **kw):
        with fk.config(single_pass=False):
            return inner(*args, **kw)
    return fn


CASES: Dict[str, Case] = {}
for _div in fk.DIVERGENCES:  # every f-divergence (kl, squared_hellinger: log-mean-exp across chunks)
    CASES[f"{_div}"] = Case(fdiv(divergence=_div))
    CASES[f"{_div}-entropy-fp32"] = Case(fdiv(divergence=_div, entropy_weight=0.1), dtype=torch.float32)
CASES.update({
    "kl-entropy-grad": Case(fdiv(divergence="kl", entropy_weight=0.2)),
    "kl-returns-entropy": Case(fdiv(divergence="kl", return_entropy=True)),
    "js-sum-bias": Case(fdiv(divergence="js", reduction="sum"), bias=True),
    "kl-none": Case(fdiv(divergence="kl", reduction="none")),
    "js-detach-rows": Case(fdiv(divergence="js", values="detach"), rows=6, length=4),
    "js-sequence-free-zloss": Case(fdiv(divergence="js", level="sequence", values="free", z_loss=0.05), rows=6,
                                   length=4),
    "kl-sequence-free-zloss": Case(fdiv(divergence="kl", level="sequence", values="free", z_loss=0.05)),
    "kl-sequence-length-normalize-long-rows": Case(fdiv(divergence="kl", level="sequence", length_normalize=True)),
    "sft-zloss": Case(fdiv(divergence="sft", z_loss=0.1)),
    "kl-two-pass": Case(two_pass(fdiv(divergence="kl", entropy_weight=0.1))),
    "kl-softcap-temperature-bias": Case(fdiv(divergence="kl", softcap=3.0, temperature=0.7, entropy_weight=0.1),
                                        bias=True),
    "kl-masked-shard": Case(fdiv(divergence="kl", entropy_weight=0.1), masked_shard=True),
    "js-masked-shard-fp32": Case(fdiv(divergence="js", entropy_weight=0.1), dtype=torch.float32, masked_shard=True),
    "kl-no-grad": Case(fdiv(divergence="kl", return_entropy=True), no_grad=True),
    "token-stats": Case(stats(entropy=False), bias=True),
    "token-stats-entropy": Case(stats(entropy=True)),
    "token-stats-entropy-fp32": Case(stats(entropy=True), dtype=torch.float32),
    "sequence-logp": Case(seq_logp),
    "dpo-sigmoid-ref-logp": Case(dpo("logp"), rows=4),
    "dpo-ipo-ref-hidden": Case(dpo("hidden", loss_type="ipo"), rows=4),
    "dpo-simpo-bias": Case(dpo("logp", loss_type="simpo", gamma=0.5), rows=4, bias=True),
    "dpo-js-hinge-long-rows-fp32": Case(dpo("logp", loss_type="hinge", divergence="js"), rows=4, length=9,
                                        dtype=torch.float32),
})
for _div in fk.PRIMAL_DIVERGENCES:
    CASES[f"primal-{_div}"] = Case(primal(divergence=_div, alpha=1.5))
CASES["primal-kl-zloss-fp32"] = Case(primal(divergence="kl", z_loss=0.05), dtype=torch.float32)
#: on the cpu backend (C++ chunk kernels) and the triton one (interpreter: slow, so few)
NATIVE = {
    "cpu-kl-entropy": Case(fdiv(divergence="kl", entropy_weight=0.1), dtype=torch.float32, backend="cpu"),
    "cpu-js-sequence-bias": Case(fdiv(divergence="js", level="sequence"), dtype=torch.float32, backend="cpu",
                                 bias=True, rows=6, length=4),
    "cpu-token-stats-entropy": Case(stats(entropy=True), dtype=torch.float32, backend="cpu"),
    "cpu-dpo-sigmoid": Case(dpo("hidden"), dtype=torch.float32, backend="cpu", rows=4),
    "cpu-kl-masked-shard": Case(fdiv(divergence="kl", entropy_weight=0.1), dtype=torch.float32, backend="cpu",
                                masked_shard=True),
    "triton-kl-entropy": Case(fdiv(divergence="kl", entropy_weight=0.1), dtype=torch.float32, backend="triton"),
    "triton-token-stats-entropy": Case(stats(entropy=True), dtype=torch.float32, backend="triton"),
}
#: the (form, world) runs of the slow triton cases
TRITON_RUNS = (("group", 2), ("group", 3))


def _runs(name: str):
    """``(form, world)`` runs of a case: the vocab_group= form on 2 and 3 ranks, the DTensor form on 3
    (``torch.chunk``'s uneven shards; the transformers patch runs it on 2)."""
    return TRITON_RUNS if name.startswith("triton") else RUNS


def run_case(case: Case, head: Head) -> dict:
    """One case on ``head``: its outputs, ``grad_hidden`` and the head's (local) gradients."""
    h, w, b, y, ref = _inputs(case)
    hp, wp, bp = h.clone().requires_grad_(not case.no_grad), head.param(w), head.param(b)
    with torch.set_grad_enabled(not case.no_grad):
        total, values = case.fn(hp, wp, bp, y, ref, case.backend, **head.kwargs)
    if total is not None and not case.no_grad:
        total.backward()
    out = {k: v.detach() for k, v in values.items()}
    out.update(grad_hidden=hp.grad, grad_weight=Head.grad(wp), grad_bias=Head.grad(bp))
    return out


# ---------------------------------------------------------------------------------------------
# Errors, a group of one, torch.compile (run on the 2-rank group)
# ---------------------------------------------------------------------------------------------

def _error_cases(rank: int, group, mesh):
    """``name -> (call, exception type, message part)``; each call raises the same on every rank."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    h, w, b, y, _ = _inputs(Case(lambda: None, bias=True))
    rows = slice(0, 21) if rank == 0 else slice(21, V)
    shard = w[rows]
    loss = lambda **kw: fk.loss(**{"hidden": h, "weight": shard, "labels": y, "vocab_group": group,  # noqa: E731
                                  "backend": "torch", **kw})
    bad_y = y.clone()
    bad_y[1, 1] = V
    other_y = y.clone()
    if rank == 1:
        other_y[2, 0] = (other_y[2, 0] + 1) % V
    return {
        "label-outside-the-vocabulary": (lambda: loss(labels=bad_y), ValueError, f"labels must lie in [0, {V})"),
        "a-rank-without-rows": (lambda: loss(weight=w if rank == 0 else w[V:]), ValueError, "shard 1 holds 0 rows"),
        "bias-shard-mismatch": (lambda: loss(bias=b[rows] if rank == 1 else b[:20]), ValueError,
                                "rank 0's bias shard has 20 rows but its weight shard 21"),
        "bias-on-one-rank": (lambda: loss(bias=b[rows] if rank == 1 else None), ValueError,
                             "some ranks of the vocabulary group pass a bias"),
        "hidden-size-differs": (lambda: loss(hidden=torch.cat([h, h[..., :1]], -1) if rank else h,
                                             weight=torch.cat([shard, shard[:, :1]], -1) if rank else shard),
                                ValueError, "the hidden size H of the weight shard differs"),
        "dtype-differs": (lambda: loss(hidden=h.float() if rank else h, weight=shard.float() if rank else shard),
                          ValueError, "the weight's dtype differs"),
        "grad-differs": (lambda: loss(weight=shard.clone().requires_grad_(rank == 0)), ValueError,
                         "which of hidden, weight and bias require gradients"),
        "labels-differ": (lambda: loss(labels=other_y), ValueError, "labels differ across the ranks"),
        "logits": (lambda: fk.loss(logits=h @ w.T, labels=y, vocab_group=group), ValueError,
                   "vocab_group= applies to (hidden, weight)"),
        "not-a-group": (lambda: loss(vocab_group=2), TypeError, "vocab_group must be a torch.distributed"),
        "dtensor-hidden": (lambda: loss(hidden=distribute_tensor(h, mesh, [Replicate()])), TypeError,
                           "hidden is a DTensor"),
        "dtensor-replicated": (lambda: fk.loss(h, distribute_tensor(w, mesh, [Replicate()]), y), ValueError,
                               "must be placed Shard(0) on a one-dimensional device mesh"),
        "dtensor-with-plain-bias": (lambda: fk.loss(h, distribute_tensor(w, mesh, [Shard(0)]), y, bias=b),
                                    TypeError, "bias must be a DTensor placed Shard(0)"),
        "compile": (lambda: torch.compile(lambda x: loss(hidden=x).loss, backend="eager")(h), RuntimeError,
                    "cannot run under torch.compile"),
    }


def _errors(rank: int, group, mesh) -> Dict[str, str]:
    got = {}
    for name, (call, kind, part) in _error_cases(rank, group, mesh).items():
        try:
            call()
            got[name] = "no error"
        except Exception as exc:  # noqa: BLE001  (recorded, compared in the parent)
            got[name] = "ok" if isinstance(exc, kind) and part in str(exc) else f"{type(exc).__name__}: {exc}"
    return got


def _group_of_one(group) -> float:
    """A group of one is the local path: the largest difference of value and gradients (0 expected)."""
    case = Case(fdiv(divergence="kl", entropy_weight=0.1))
    one = run_case(case, Head("group", 1, 0, group))
    whole = run_case(case, Head())
    return max(float((one[k] - whole[k]).abs().max()) for k in one if one[k] is not None)


def _communication(group) -> dict:
    """The collectives (``(name, op, shape)`` in order) and the checks of one ``fk.loss`` forward +
    backward on ``group``, with and without the entropy."""
    import torch.distributed as dist

    from fdiv_kernels import checks

    log, calls = [], {}
    originals = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "broadcast")}
    checked = {n: getattr(checks, n) for n in ("check_vocab_layout", "check_vocab_shards", "check_head",
                                               "check_label_values", "check_loss_data")}

    def collective(name):
        def call(*a, **k):
            t = a[0] if isinstance(a[0], torch.Tensor) else a[1]
            log.append((name, str(k.get("op", "")).rsplit(".", 1)[-1], tuple(t.shape)))
            return originals[name](*a, **k)
        return call

    def counted(name):
        def call(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return checked[name](*a, **k)
        return call

    out = {}
    try:
        for n in originals:
            setattr(dist, n, collective(n))
        for n in checked:
            setattr(checks, n, counted(n))
        for entropy in (False, True):
            log.clear()
            calls.clear()
            run_case(Case(fdiv(divergence="kl", return_entropy=entropy)), Head("group", 2, dist.get_rank(group), group))
            out[entropy] = (list(log), dict(calls))
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
        for n, f in checked.items():
            setattr(checks, n, f)
    return out


# ---------------------------------------------------------------------------------------------
# The transformers patch on a ColwiseParallel head
# ---------------------------------------------------------------------------------------------

PATCHES = {"js": dict(divergence="js", beta=0.5), "kl-sequence": dict(divergence="kl", level="sequence"),
           "dpo": dict(spec=fk.DPOSpec("sigmoid", beta=0.2))}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def patched_grads(name: str, mesh=None) -> dict:
    """One step of a patched tiny Llama (its lm_head parallelised with ColwiseParallel on ``mesh``
    when given): the loss and every parameter's (local) gradient."""
    from fdiv_kernels.integrations import transformers as fk_hf

    model = _llama()
    if mesh is not None:
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    fk_hf.apply(model, **PATCHES[name])
    ids = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(ref_logp=-torch.rand(4, generator=torch.Generator().manual_seed(6)) * 5) if name == "dpo" else {}
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    grads = {n: Head.grad(p) for n, p in model.named_parameters()}
    return {"loss": out.loss.detach(), **grads}


# ---------------------------------------------------------------------------------------------
# The processes
# ---------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, out: str, native: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))
    _small_chunks()
    result = {"runs": {}, "failures": {}}
    try:
        groups = {2: dist.new_group([0, 1]), 3: dist.group.WORLD}
        meshes = {2: DeviceMesh("cpu", [0, 1]), 3: DeviceMesh("cpu", list(range(world)))}
        singles = [dist.new_group([r]) for r in range(world)]
        for name, case in {**CASES, **{k: NATIVE[k] for k in native}}.items():
            for form, size in _runs(name):
                if rank < size:
                    try:
                        result["runs"][(name, form, size)] = run_case(case, Head(form, size, rank, groups[size],
                                                                                 meshes[size]))
                    except Exception:  # noqa: BLE001  (a failure on every rank: reported by the parent)
                        result["failures"][(name, form, size)] = traceback.format_exc()
        result["group_of_one"] = _group_of_one(singles[rank])
        if rank < 2:
            result["errors"] = _errors(rank, groups[2], meshes[2])
            result["communication"] = _communication(groups[2])
            result["patches"] = {name: patched_grads(name, meshes[2]) for name in PATCHES}
        dist.barrier()
    finally:
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _native_cases() -> tuple:
    available = fk.available_backends("cpu")
    return tuple(k for k, c in NATIVE.items() if available.get(c.backend) == "available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results (``[rank] -> dict``), from one spawn of :data:`WORLD` processes; this
    process computes the whole head's results in the same small chunks, restored after the module."""
    for k in ("RANK", "WORLD_SIZE"):
        assert os.environ.get(k) in (None, "1", "0"), "run this test outside torchrun"
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out), _native_cases()), nprocs=WORLD, join=True,
                       start_method="spawn")
    names = ("TWO_PASS_ELEMENTS", "CPU_SINGLE_PASS_ELEMENTS", "TORCH_SINGLE_PASS_BYTES")
    saved = {k: getattr(chunk_sizes, k) for k in names}
    _small_chunks()
    try:
        yield [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    finally:
        for k, v in saved.items():
            setattr(chunk_sizes, k, v)


def _close(got, want, dtype, what):
    assert (got is None) == (want is None), what
    if want is not None:
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _check(ranks, name: str, case: Case) -> None:
    whole = run_case(case, Head())
    for form, size in _runs(name):
        key = (name, form, size)
        fails = [r["failures"][key] for r in ranks[:size] if key in r["failures"]]
        assert not fails, fails[0]
        parts = [r["runs"][key] for r in ranks[:size]]
        for k, want in whole.items():
            if k in ("grad_weight", "grad_bias"):  # each rank's rows, in vocabulary order
                got = None if parts[0][k] is None else torch.cat([p[k] for p in parts])
                _close(got, want, case.dtype, f"{key} {k}")
            else:  # the same on every rank: values and grad_hidden (summed over the group)
                for r, p in enumerate(parts):
                    _close(p[k], want, case.dtype, f"{key} rank {r} {k}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_head_matches_one_process(ranks, name):
    _check(ranks, name, CASES[name])


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_backends_match_one_process(ranks, name):
    if name not in _native_cases():
        pytest.skip(f"backend {NATIVE[name].backend!r} is not available here")
    _check(ranks, name, NATIVE[name])


def test_a_group_of_one_is_the_local_path(ranks):
    assert [r["group_of_one"] for r in ranks] == [0.0] * WORLD


def test_communication_per_call_is_two_small_all_reduces_per_chunk(ranks):
    """One fk.loss forward + backward on 2 ranks: one all-gather of the shard facts, per chunk an
    all-reduce MAX of [rows] and a SUM of [2, rows] ([4, rows] with entropy), one all-reduce of the
    supervised grad_hidden [n, H]; nothing of size V; every check once (docs/performance.md)."""
    n = 15  # supervised tokens of the default case: chunks of CHUNK_TOKENS
    rows = [CHUNK_TOKENS] * (n // CHUNK_TOKENS) + ([n % CHUNK_TOKENS] if n % CHUNK_TOKENS else [])
    for entropy, width in ((False, 2), (True, 4)):
        for r in ranks[:2]:
            log, calls = r["communication"][entropy]
            stats = [c for m in rows for c in (("all_reduce", "MAX", (m,)), ("all_reduce", "SUM", (width, m)))]
            assert log == [("all_gather", "", (len(fk.checks.SHARD_FACTS),)), *stats, ("all_reduce", "SUM", (n, H))]
            assert calls == dict.fromkeys(("check_vocab_layout", "check_vocab_shards", "check_head",
                                           "check_label_values", "check_loss_data"), 1)


def test_bad_input_raises_the_same_clear_error_on_every_rank(ranks):
    names = set(ranks[0]["errors"])
    for r in ranks[:2]:
        bad = {k: v for k, v in r["errors"].items() if v != "ok"}
        assert not bad, bad
        assert set(r["errors"]) == names


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_transformers_patch_on_a_colwise_parallel_head_matches_one_process(ranks, name):
    want = patched_grads(name)
    parts = [r["patches"][name] for r in ranks[:2]]
    for k, w in want.items():
        if k == "lm_head.weight":
            got = torch.cat([p[k] for p in parts])
            assert parts[0][k].shape[0] < V  # the head stayed sharded
        else:
            got = parts[0][k]
            for p in parts[1:]:
                torch.testing.assert_close(p[k], got, rtol=0, atol=0, msg=lambda m: f"{k} across ranks: {m}")
        torch.testing.assert_close(got, w, rtol=2e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
