"""README.md's Python snippets run as written, on a tiny Hugging Face model (a snippet that does not
run, or a reference recipe that misaligns by one token, fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace():
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model, ref_model = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    input_ids = torch.randint(0, 61, (4, 9))
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    return {"model": model, "ref_model": ref_model, "input_ids": input_ids, "labels": labels}


def test_the_readme_has_python_snippets():
    assert _python_blocks()


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_snippet_runs_as_written(index):
    ns = _namespace()
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), ns)  # noqa: S102
    if "out" in ns and "ref_logp" in ns:  # the reference recipe: aligned with the policy's positions
        assert ns["ref_logp"].shape == ns["out"].logp.shape == ns["labels"][:, 1:].shape
        assert ns["model"].lm_head.weight.grad is not None


def test_the_reference_recipe_with_the_policy_as_reference_gives_zero_rewards():
    ns = _namespace()
    ns["ref_model"] = ns["model"]
    exec(compile(_python_blocks()[0], "README.md python block 0", "exec"), ns)  # noqa: S102
    assert torch.equal(ns["out"].reward, torch.zeros_like(ns["out"].reward))
