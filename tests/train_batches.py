"""Batches of the trainer's synthetic tasks (character tokenizer) and their full-logits reference
log-probs, shared by the trainer-step tests (test_train_steps.py, test_hf.py)."""

import random

import oracle

from fdiv_kernels import collate as C
from fdiv_kernels import data as D
from fdiv_kernels.train.synthetic import near_miss, preference_row, problems, sft_row
from fdiv_kernels.train.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


def sft_batch(n=6, seed=0):
    rows = [sft_row(p) for p in problems(n, seed=seed)]
    return C.collate(D.encode_sft(TOK, rows, max_length=40), pad_id=TOK.pad_token_id)


def pair_rows(n=4, seed=0):
    """``n`` encoded preference pairs (near-miss rejected answers)."""
    rng = random.Random(seed)
    rows = [preference_row(p, near_miss(p, rng)) for p in problems(n, seed=seed)]
    return D.encode_pref(TOK, rows, max_length=40)


def pair_batch(n=4, seed=0):
    """``[2n, T]``: the chosen answers, then the rejected ones."""
    return C.collate_pairs(pair_rows(n, seed), pad_id=TOK.pad_token_id)


def full_logp(model, batch):
    """``(logp [B, T-1], mask, logits)``: per-token log-probs of the shifted labels from the model's
    own full logits (its forward, plain autograd)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return oracle.stats(logits, labels).logp, mask, logits
