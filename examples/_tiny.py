"""Tiny, offline building blocks shared by the examples (no hub access needed).

``tiny_tokenizer()``: a word-level tokenizer built in memory. ``tiny_llama(tok)``: a 2-layer
Llama with hidden size 32. ``sft_texts()`` / ``preference_pairs()``: a handful of sentences.
With a real model, pass ``--model <path or hub id>`` to the examples instead.
"""

from __future__ import annotations

import torch

WORDS = "the cat dog sat on mat a ran fast slow big small red blue and then".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(tok, *, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def load_model_and_tokenizer(name_or_path: str | None, *, seed: int = 0):
    """``(model, tokenizer)``: the tiny offline pair when ``name_or_path`` is None, else ``from_pretrained``."""
    if name_or_path is None:
        tok = tiny_tokenizer()
        return tiny_llama(tok, seed=seed), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name_or_path), tok


def checkpointing(config_cls, enabled: bool) -> dict:
    """The keyword that turns activation checkpointing on or off in a TrainingArguments subclass
    (TRL's ``SFTConfig``, ``DPOConfig``): ``activation_checkpointing`` where transformers has it
    (``gradient_checkpointing``, which TRL sets by default, is then a deprecated alias that raises a
    FutureWarning), else ``gradient_checkpointing``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def sft_texts():
    return ["the cat sat on the mat", "a dog ran fast", "the big red dog sat", "a small blue cat ran slow",
            "the dog and the cat sat", "a red cat then ran"] * 4


def preference_pairs():
    return {"prompt": ["the cat", "a dog", "the big", "a small"] * 4,
            "chosen": [" sat on the mat", " ran fast", " red dog sat", " blue cat"] * 4,
            "rejected": [" ran", " sat on a mat slow", " dog", " cat ran slow fast"] * 4}
