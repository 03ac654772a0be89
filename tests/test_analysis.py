"""Value analysis: lse at chosen states, Kendall tau, V(s0) curves from checkpoints, CLI."""

import json
import os

import pytest
import torch

from fdiv_kernels.analysis import kendall_tau, rank_agreement, segment_values, state_values, value_s0
from fdiv_kernels.analysis.cli import main as analyze_main


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv_kernels.train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def full_lse(model, ids):
    with torch.no_grad():
        return torch.logsumexp(model(ids).logits.float(), -1)


def test_kendall_tau_known_values():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)  # tau-b with a tie in x
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2], [1])


def test_kendall_tau_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=g).tolist()
    y = torch.randint(0, 5, (40,), generator=g).tolist()
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_rank_agreement_table():
    t = rank_agreement({"a": [1, 2, 3], "b": [1, 3, 2], "outcome": [3, 2, 1]})
    assert t["a"]["a"] == 1.0 and t["a"]["b"] == t["b"]["a"] == pytest.approx(1 / 3)
    assert t["a"]["outcome"] == pytest.approx(-1.0)


def test_state_values_and_value_s0_equal_full_logits_lse(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("<s><|user|>add 1+2<|assistant|>3</s>", add_special_tokens=False)["input_ids"]])
    pos = torch.zeros_like(ids, dtype=torch.bool)
    pos[0, [2, 5, ids.shape[1] - 1]] = True
    v = state_values(model, ids, pos, backend="torch")
    ref = full_lse(model, ids)
    torch.testing.assert_close(v[pos], ref[pos], atol=1e-5, rtol=1e-5)
    assert (v[~pos] == 0).all()
    prompts = ["<s><|user|>add 1+2<|assistant|>", "<s><|user|>reverse abc<|assistant|>"]
    v0 = value_s0(model, tok, prompts)
    for p, got in zip(prompts, v0):
        pid = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        assert got.item() == pytest.approx(full_lse(model, pid)[0, -1].item(), abs=1e-5)


def test_segment_values_pick_the_last_token_of_each_step(tiny):
    model, tok = tiny
    prompt, response = "<s><|user|>q<|assistant|>", "ab\ncde\nf"
    segs, v = segment_values(model, tok, prompt, response)
    assert segs == ["ab", "cde", "f"]
    ids = torch.tensor([tok(prompt + response, add_special_tokens=False)["input_ids"]])
    lse = full_lse(model, ids)[0]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    want = lse[[n_prompt + 1, n_prompt + 5, n_prompt + 7]]  # 'b', 'e', 'f'
    torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5)


def test_values_cli_over_checkpoints(tiny, tmp_path, capsys):
    model, tok = tiny
    phase = tmp_path / "sft"
    for step in (10, 20):
        d = phase / f"checkpoint-{step}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        torch.save({"step": step}, d / "trainer_state.pt")
        with torch.no_grad():
            model.lm_head.weight.mul_(2.0)  # a different model per checkpoint
    data = tmp_path / "eval.jsonl"
    rows = [{"prompt": "add 1+2", "prompt_id": "x", "messages": [{"role": "user", "content": "add 1+2"},
                                                                   {"role": "assistant", "content": "3"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert analyze_main(["values", "--phase-dir", str(phase), "--eval", str(data), "--out", str(out)]) == 0
    res = json.loads((out / "value_s0.json").read_text())
    assert [r["step"] for r in res] == [10, 20]
    assert res[0]["mean"] != res[1]["mean"]
    assert os.path.getsize(out / "value_s0.png") > 1000
    captured = capsys.readouterr()
    assert f"fdiv-analyze: wrote {out / 'value_s0.png'} and {out / 'value_s0.json'}" in captured.err  # not stdout


def test_rank_labels_are_unique(tmp_path):
    from fdiv_kernels.analysis.cli import model_labels
    from fdiv_kernels.errors import ConfigError

    a, b, c = (str(tmp_path / r / "sft" / "final") for r in ("run_a", "run_b", "run_c"))
    assert model_labels([a, b, c]) == [(os.path.join(r, "sft", "final"), p)
                                       for r, p in (("run_a", a), ("run_b", b), ("run_c", c))]
    assert model_labels(["base=" + a, b]) == [("base", a), ("final", b)]
    assert model_labels([a]) == [("final", a)]
    with pytest.raises(ConfigError, match="two models labelled 'x'"):
        model_labels(["x=" + a, "x=" + b])
    with pytest.raises(ConfigError, match="'outcome' is the label"):
        model_labels(["outcome=" + a])


def test_rank_cli_keeps_models_that_share_a_directory_name_apart(tiny, tmp_path, capsys):
    """Three runs' `.../sft/final` are three entries (they used to collapse into one 'final')."""
    model, tok = tiny
    paths = []
    for i, r in enumerate(("a", "b", "c")):
        d = tmp_path / "runs" / r / "sft" / "final"
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5 + i)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(str(d))
    data = tmp_path / "traj.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "<s><|user|>q<|assistant|>", "response": resp, "score": s})
                              for resp, s in (("ab\ncd\ne", 1.0), ("xy\nz", 0.0), ("q\nrs\nt\nu", 0.5))) + "\n")
    assert analyze_main(["rank", "--data", str(data)] + sum((["--model", p] for p in paths), [])) == 0
    table = json.loads(capsys.readouterr().out)  # stdout is the JSON table and nothing else
    assert set(table) == {"a/sft/final", "b/sft/final", "c/sft/final", "outcome"}
    assert analyze_main(["rank", "--data", str(data), "--model", paths[0], "--model", "/nope"]) == 2
    assert "'/nope' is not a directory" in capsys.readouterr().err


def test_analyze_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert analyze_main(["values", "--phase-dir", str(tmp_path), "--eval", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fdiv-analyze: error: --phase-dir") and "\n" not in err


def test_docstring_example_paths_are_what_a_demo_run_writes():
    """The CLI docstring names only run paths the pipeline writes (runs/demo/base never existed)."""
    import re

    from fdiv_kernels.analysis import cli

    named = set(re.findall(r"runs/demo/([\w/.]+)", cli.__doc__))
    writes = {"sft", "analysis", "pretrain/final", "sft/final", "dpo/final", "data/pref_eval.jsonl",
              "data/eval_prompts.jsonl"}
    assert named and named <= writes, named - writes
