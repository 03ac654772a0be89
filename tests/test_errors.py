"""Bad input gives a clear error naming the problem."""

import pytest
import torch

import fdiv_kernels as fk


def ok():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


def test_mismatched_hidden_and_weight():
    h, w, y = ok()
    with pytest.raises(ValueError, match="last dimension must equal weight's H"):
        fk.token_stats(h, torch.randn(11, 9), y)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        fk.token_stats(h, torch.randn(11, 8, 1), y)


def test_labels_shape():
    h, w, y = ok()
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        fk.loss(h, w, y[:, :4])
    with pytest.raises(ValueError, match="labels must have logits' leading shape"):
        fk.loss(logits=torch.randn(2, 5, 11), labels=y[:1])


def test_non_floating_hidden_and_integer_dtypes():
    h, w, y = ok()
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        fk.token_stats(h.long(), w, y)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fk.token_stats(h, w, y.float())
    with pytest.raises(TypeError, match="share a dtype"):
        fk.token_stats(h, w.double(), y)


@pytest.mark.parametrize("bad", [11, -1, 1000])
def test_labels_out_of_range(bad):
    h, w, y = ok()
    y[1, 3] = bad
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 11\).*found {bad} at position \(1, 3\)"):
        fk.loss(h, w, y)


def test_unknown_divergence_lists_known_ones():
    h, w, y = ok()
    with pytest.raises(ValueError, match="unknown divergence 'wasserstein'; known: .*js.*pearson"):
        fk.loss(h, w, y, divergence="wasserstein")


@pytest.mark.parametrize("kw,msg", [
    (dict(level="document"), "level='document' is not supported"),
    (dict(reduction="max"), "reduction='max' is not supported"),
    (dict(values="gauge"), "values='gauge' is not supported"),
    (dict(beta=0.0), "beta must be"),
    (dict(beta=float("nan")), "beta must be"),
    (dict(length_normalize=True), "length_normalize=True applies to level='sequence'"),
    (dict(reduction="none", values="free"), "use reduction='mean' or 'sum'"),
    (dict(softcap=-1.0), "softcap must be None or > 0"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(backend="fortran"), "unknown backend 'fortran'"),
])
def test_bad_options(kw, msg):
    h, w, y = ok()
    with pytest.raises(ValueError, match=msg):
        fk.loss(h, w, y, **kw)


def test_bad_bias_and_ref():
    h, w, y = ok()
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        fk.token_stats(h, w, y, bias=torch.randn(10))
    with pytest.raises(ValueError, match="ref_logp must have shape"):
        fk.loss(h, w, y, ref_logp=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ref_logp must have shape"):
        fk.loss(h, w, y, ref_logp=torch.zeros(2))  # per-row reference only at sequence level


def test_logits_and_hidden_together_or_neither():
    h, w, y = ok()
    with pytest.raises(ValueError, match="either logits= or"):
        fk.loss(h, w, y, logits=torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match="needs"):
        fk.loss(labels=y)


def test_devices_that_differ():
    h, w, y = ok()
    with pytest.raises(ValueError, match="one device"):
        fk.token_stats(h, w, y.to("meta"))


def test_a_backend_this_machine_cannot_run_suggests_auto():
    """backend="cuda" with CPU tensors, or on a CPU-only torch: the error says what to use instead."""
    from fdiv_kernels.kernels.backends import get_backend

    h, w, y = ok()
    with pytest.raises(ValueError, match=r"runs on cuda tensors, got cpu tensors; backend='auto' picks"):
        fk.token_stats(h, w, y, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: .*; backend='auto' picks"):
            get_backend("cuda", "cuda")
