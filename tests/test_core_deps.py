"""The core needs torch only: with transformers, yaml, matplotlib, tqdm and safetensors made
unimportable (a ``sys.meta_path`` blocker in a fresh interpreter), ``import fdiv_kernels`` and the
core calls work, and the trainer and the transformers integration raise an ``ImportError`` that
names the pip extra to install."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("transformers", "yaml", "matplotlib", "tqdm", "safetensors")

BLOCKER = textwrap.dedent(f"""
    import sys

    class Blocker:
        blocked = {BLOCKED!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_core_works_with_torch_only():
    res = _run("""
        import torch
        import fdiv_kernels as fk

        g = torch.Generator().manual_seed(0)
        h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
        w = torch.randn(11, 8, generator=g, requires_grad=True)
        y = torch.randint(0, 11, (2, 5), generator=g)
        out = fk.loss(h, w, y, divergence="js", ref_logp=-torch.rand(2, 5, generator=g), beta=0.5, backend="torch")
        out.loss.backward()
        logp, lse = fk.token_stats(h, w, y, backend="torch")[:2]
        z = h.detach() @ w.detach().T
        assert torch.allclose(lse, torch.logsumexp(z, -1), atol=1e-5)
        pol = fk.dpo_loss(-torch.rand(3), -torch.rand(3), -torch.rand(3), -torch.rand(3), beta=0.1)
        assert torch.isfinite(pol.loss)
        mod = fk.nn.FusedLinearFDivLoss(divergence="kl")
        assert torch.isfinite(mod(h, w, y)) and torch.isfinite(out.loss) and h.grad is not None
        assert not set(sys.modules) & set({blocked!r}), sorted(set(sys.modules) & set({blocked!r}))
        print("ok")
    """.replace("{blocked!r}", repr(BLOCKED)))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_trainer_and_integration_name_their_extra():
    for module, extra in (("fdiv_kernels.train", "train"), ("fdiv_kernels.integrations.transformers", "hf")):
        res = _run(f"""
            try:
                import {module}
            except ImportError as exc:
                print("ImportError:", exc)
        """)
        assert res.returncode == 0, res.stderr[-3000:]
        msg = res.stdout
        assert msg.startswith("ImportError:") and f"pip install 'fdiv-kernels[{extra}]'" in msg, (module, msg)
        assert module in msg, msg
