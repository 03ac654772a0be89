"""Every input and data check runs once per call, from one module (fdiv_kernels/checks.py), and a
one-pass ``fk.loss`` reads the device no more often than before the layered core (docs/design.md).

Host reads are counted with a ``TorchFunctionMode`` that sees every ``Tensor.__bool__``,
``__float__``, ``__int__``, ``item``, ``tolist`` and ``nonzero`` (each one a device sync on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fdiv_kernels as fk
from fdiv_kernels import checks
from fdiv_kernels.kernels import native

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"}
#: host reads of one fk.loss forward on the cpu backend before the layered core (commit ab7866d):
#: the label range check, the chunk plan (row counts, token positions), the data check; kl adds one
#: read per chunk (its log-sum-exp, for the exact accumulation across chunks)
BEFORE = {"sft": 4, "js": 4, "kl": 5}

_cpu_problem = native._toolchain_problem("cpu")
needs_cpu = pytest.mark.skipif(_cpu_problem is not None, reason=f"cannot build the C++ extension: {_cpu_problem}")


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 64, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 500, (4, 64), generator=g)
    labels[0, :5] = -100
    return hidden, weight, labels, -torch.rand(4, 64, generator=g)


@needs_cpu
@pytest.mark.parametrize("divergence", sorted(BEFORE))
def test_one_pass_loss_reads_the_device_no_more_than_before(divergence):
    hidden, weight, labels, ref = _inputs()
    fk.loss(hidden, weight, labels, divergence=divergence, backend="cpu")  # build and warm up
    with HostReads() as reads:
        out = fk.loss(hidden, weight, labels, divergence=divergence, ref_logp=ref, beta=0.5, backend="cpu")
    assert reads.count <= BEFORE[divergence], reads.count
    with HostReads() as reads:
        out.loss.backward()
    assert reads.count <= 1  # grad_output, read once (0 when the mode does not see the engine's call)


def _spy(monkeypatch, names):
    calls = {n: 0 for n in names}
    for n in names:
        orig = getattr(checks, n)

        def wrapped(*a, _n=n, _orig=orig, **k):
            calls[_n] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(checks, n, wrapped)
    return calls


@pytest.mark.parametrize("path", ["one_pass", "two_pass", "no_grad", "logits"])
def test_each_check_runs_once_per_loss_call(monkeypatch, path):
    hidden, weight, labels, ref = _inputs()
    calls = _spy(monkeypatch, ["check_head", "check_logits", "check_label_values", "check_reference",
                               "check_loss_data", "check_token_stats"])
    with fk.config(single_pass=path != "two_pass"), torch.set_grad_enabled(path != "no_grad"):
        if path == "logits":
            fk.loss(logits=hidden @ weight.T, labels=labels, divergence="js", ref_logp=ref)
        else:
            fk.loss(hidden, weight, labels, divergence="js", ref_logp=ref, backend="torch")
    head_check = "check_logits" if path == "logits" else "check_head"
    assert calls == {"check_head": int(path != "logits"), "check_logits": int(path == "logits"),
                     "check_label_values": 1, "check_reference": 1, "check_loss_data": 1,
                     "check_token_stats": 0}, (head_check, calls)


@pytest.mark.parametrize("path", ["one_pass", "two_pass", "no_grad", "logits"])
def test_cross_entropy_option_checks_run_once(monkeypatch, path):
    """Class weights and label smoothing (their scope check and their one data check) and token
    accuracy's check: once per call."""
    hidden, weight, labels, _ = _inputs()
    cw = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(1))
    calls = _spy(monkeypatch, ["check_class_options", "check_class_data", "check_label_values", "check_loss_data",
                               "check_token_accuracy"])
    with fk.config(single_pass=path != "two_pass"), torch.set_grad_enabled(path != "no_grad"):
        if path == "logits":
            fk.loss(logits=hidden @ weight.T, labels=labels, label_smoothing=0.1, class_weight=cw,
                    return_token_accuracy=True)
        else:
            fk.loss(hidden, weight, labels, label_smoothing=0.1, class_weight=cw, backend="torch",
                    return_token_accuracy=True)
    assert calls == {"check_class_options": 1, "check_class_data": 1, "check_label_values": 1, "check_loss_data": 1,
                     "check_token_accuracy": 1}


@needs_cpu
def test_cross_entropy_options_read_the_device_once_more():
    """The options add one host read (their data check) to the one-pass loss, none when off."""
    hidden, weight, labels, _ = _inputs()
    cw = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(1))
    fk.loss(hidden, weight, labels, backend="cpu")  # build and warm up
    with HostReads() as off:
        fk.loss(hidden, weight, labels, backend="cpu", label_smoothing=0.0)
    with HostReads() as on:
        fk.loss(hidden, weight, labels, backend="cpu", label_smoothing=0.1, class_weight=cw)
    assert off.count <= BEFORE["sft"] and on.count == off.count + 1, (off.count, on.count)


def test_each_check_runs_once_per_token_stats_call(monkeypatch):
    hidden, weight, labels, _ = _inputs()
    calls = _spy(monkeypatch, ["check_head", "check_label_values", "check_token_stats", "check_loss_data"])
    fk.token_stats(hidden, weight, labels, backend="torch")
    assert calls == {"check_head": 1, "check_label_values": 1, "check_token_stats": 1, "check_loss_data": 0}
    calls.update(dict.fromkeys(calls, 0))
    fk.sequence_logp(hidden, weight, labels, backend="torch")
    assert calls == {"check_head": 1, "check_label_values": 1, "check_token_stats": 1, "check_loss_data": 0}


def test_dpo_module_checks_once(monkeypatch):
    hidden, weight, labels, _ = _inputs()
    ref = -torch.rand(4) * 10
    calls = _spy(monkeypatch, ["check_head", "check_label_values", "check_loss_data", "check_pairs"])
    fk.nn.FusedLinearDPOLoss(backend="torch")(hidden, weight, labels, ref_logp=ref, return_output=True)
    assert calls == {"check_head": 1, "check_label_values": 1, "check_loss_data": 1, "check_pairs": 0}


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_checks_once(monkeypatch, reduction):
    """fk.distill_loss: each input check once, the data check once (at the forward), nothing in the
    backward (reduction="none" reruns the pass there without checks)."""
    hidden, weight, labels, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    th, tw = torch.randn(4, 64, 16, generator=g), torch.randn(500, 16, generator=g)
    calls = _spy(monkeypatch, ["check_head", "check_distill_inputs", "check_label_values", "check_distill_data",
                               "check_loss_data"])
    out = fk.distill_loss(hidden, weight, labels, teacher_hidden=th, teacher_weight=tw, divergence="js",
                          reduction=reduction, backend="torch")
    out.loss.sum().backward()
    assert calls == {"check_head": 1, "check_distill_inputs": 1, "check_label_values": 1, "check_distill_data": 1,
                     "check_loss_data": 0}
