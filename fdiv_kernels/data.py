"""The data formats the trainer and the analysis tools read: loaders, schema checks and
tokenization with prompt masking (the collators are :mod:`fdiv_kernels.collate`'s; the trainer's
sampler is :mod:`fdiv_kernels.train.sampling`).

Schemas (the Hugging Face data sets the paper trains on):

* SFT, UltraChat-200K: ``{"prompt": str, "prompt_id": str, "messages": [{"role", "content"}, ...]}``
  with at least one ``assistant`` message;
* preferences, UltraFeedback-binarized: ``{"prompt", "prompt_id", "chosen": [messages],
  "rejected": [messages], "score_chosen": float, "score_rejected": float}``; ``chosen`` and
  ``rejected`` end with an assistant message and share the messages before it.

A data set is given as (:func:`read_rows`)

* a JSON lines (``.jsonl``/``.json``, one object per line) or parquet file, a directory of such
  files or a glob (read here);
* a ``datasets`` data set, read with ``datasets`` (which does the caching, revisions and auth):
  a directory written by ``save_to_disk``, a local data set folder (parquet / JSON shards such as
  ``data/train_sft-00000-of-00003.parquet``, or a README naming the splits), or a Hugging Face
  Hub id, each with ``:split`` where it has several (``HuggingFaceH4/ultrachat_200k:train_sft``,
  ``/data/ultrachat_200k:test_sft``, ``...:train_sft[:1000]``); a Hub id always names its split.

A malformed row raises :class:`DataError` naming the file and the 1-based line (row for parquet
and ``datasets``).

Tokenization uses the tokenizer's chat template. Labels are the input ids on the tokens of the
supervised assistant messages (their content and the end-of-turn token the template adds) and
``-100`` everywhere else (prompt, template tokens, padding). SFT supervises every assistant
turn; preference rows supervise the final assistant turn only. Sequences longer than
``max_length`` are truncated on the right; batches are padded on the right.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .collate import IGNORE_INDEX
from .errors import DataError
from .hf import hub_id


# ----------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------

#: ``NAME:SPLIT`` (a split may carry a ``datasets`` slice: ``train_sft[:1000]``)
_SPLIT = re.compile(r"^(?P<name>[^:]+):(?P<split>[A-Za-z0-9_.-]+(\[[^\]]*\])?)$")


def _saved_to_disk(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _data_files(path: str) -> List[str]:
    pattern = os.path.join(path, "*") if os.path.isdir(path) else path
    return sorted(f for f in glob.glob(pattern) if f.endswith((".jsonl", ".json", ".parquet")))


def read_rows(path: str) -> List[Tuple[int, dict]]:
    """``[(line_or_row_number, row_dict), ...]`` of a data set (the forms of the module docstring).

    A file is read here; a directory or a glob pattern (``data/train_sft-*.parquet``) reads every
    matching file in sorted order (row numbers restart per file; errors name the file). A
    ``save_to_disk`` directory, a data set folder without data files at its top, ``PATH:SPLIT``
    and a Hub id go to :func:`read_dataset`.
    """
    named = _SPLIT.match(path)
    if named and not os.path.exists(path) and (os.path.isdir(named["name"]) or hub_id(named["name"])):
        return read_dataset(named["name"], named["split"])
    if os.path.isdir(path) and (_saved_to_disk(path) or not _data_files(path)):
        return read_dataset(path, None)
    if not os.path.exists(path) and hub_id(path) and not path.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"{path}: no such file or directory, and a Hugging Face Hub data set needs a split: "
                        f"{path}:SPLIT (e.g. HuggingFaceH4/ultrachat_200k:train_sft)")
    if os.path.isdir(path) or any(c in path for c in "*?["):
        files = _data_files(path)
        if not files:
            raise DataError(f"{path}: no .jsonl/.json/.parquet files")
        return [(f"{f}:{n}", r) for f in files for n, r in _read_file(f)]
    return _read_file(path)


def _read_file(path: str) -> List[Tuple[int, dict]]:
    """``[(line_or_row_number, row_dict), ...]`` of one JSONL or parquet file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow ships with datasets
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        return [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_dataset(name: str, split: Optional[str]) -> List[Tuple[int, dict]]:
    """``[(row_number, row_dict), ...]`` of split ``split`` of a ``datasets`` data set: a
    ``save_to_disk`` directory (``datasets.load_from_disk``), else a local data set folder or a
    Hugging Face Hub id (``datasets.load_dataset(name, split=split)``; downloads and caches a Hub
    data set). ``split=None``: the only split there is. Problems raise a one-line :class:`DataError`."""
    where = f"{name}:{split}" if split else name
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: reading a data set by name needs the datasets package: "
                        "pip install datasets") from None
    try:
        if os.path.isdir(name) and _saved_to_disk(name):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
            split = split or "?"  # load_dataset without a split gave every split
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise DataError(f"{where}: {'name a split' if split in (None, '?') else f'no split {split!r}'}: "
                                f"{name}:SPLIT with SPLIT one of {', '.join(ds)}")
            ds = ds[split]
    except (OSError, ValueError) as err:  # ConnectionError (offline), DatasetNotFoundError, unknown split
        if isinstance(err, DataError):
            raise
        hint = "" if os.path.exists(name) else ("; check the name, the network and HF_HUB_OFFLINE / "
                                                "HF_DATASETS_OFFLINE, or give a local path")
        raise DataError(f"{where}: datasets cannot read it ({' '.join(str(err).split())[:300]}){hint}") from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{where}: no rows")
    return list(enumerate(rows, 1))


def _check_messages(where: str, key: str, msgs) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{i}] has unknown role {m['role']!r}")


def validate_sft_row(where: str, row: dict) -> dict:
    """Check an UltraChat-schema row; returns it."""
    if "messages" not in row:
        raise DataError(f"{where}: missing key 'messages' (UltraChat schema: prompt, prompt_id, messages)")
    _check_messages(where, "messages", row["messages"])
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise DataError(f"{where}: 'messages' has no assistant message to train on")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string")
    return row


def validate_pref_row(where: str, row: dict) -> dict:
    """Check an UltraFeedback-binarized-schema row; returns it."""
    for k in ("chosen", "rejected"):
        if k not in row:
            raise DataError(f"{where}: missing key {k!r} (UltraFeedback schema: prompt, prompt_id, chosen, "
                            "rejected, score_chosen, score_rejected)")
        _check_messages(where, k, row[k])
        if row[k][-1]["role"] != "assistant":
            raise DataError(f"{where}: {k!r} must end with an assistant message")
    if row["chosen"][:-1] != row["rejected"][:-1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' must share the messages before the last answer")
    for k in ("score_chosen", "score_rejected"):
        if k in row and row[k] is not None and not isinstance(row[k], (int, float)):
            raise DataError(f"{where}: {k!r} must be a number")
    return row


def _where(path: str, n) -> str:
    return n if isinstance(n, str) else f"{path}:{n}"


def load_sft(path: str) -> List[dict]:
    """Validated UltraChat-schema rows of a file, directory or glob."""
    return [validate_sft_row(_where(path, n), r) for n, r in read_rows(path)]


def load_pref(path: str) -> List[dict]:
    """Validated UltraFeedback-binarized-schema rows of a file, directory or glob."""
    return [validate_pref_row(_where(path, n), r) for n, r in read_rows(path)]


# ----------------------------------------------------------------------------------------------
# Tokenizing with the chat template
# ----------------------------------------------------------------------------------------------

def _template(tok, messages, *, generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_messages(tok, messages: Sequence[dict], *, max_length: int, last_turn_only: bool = False,
                    where: str = "") -> Dict[str, List[int]]:
    """``{"input_ids", "labels"}`` for a conversation; labels supervise assistant turns.

    Each assistant message ``i`` supervises the characters between the templated text of
    ``messages[:i]`` (with the generation prompt) and that of ``messages[:i+1]``; tokens whose
    character offsets start in such a span get their id as label, others -100. Needs a fast
    tokenizer (offset mapping).
    """
    full = _template(tok, messages, generation_prompt=False)
    spans = []
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_turn_only:
        idx = idx[-1:]
    for i in idx:
        start_text = _template(tok, messages[:i], generation_prompt=True) if i else ""
        end_text = _template(tok, messages[: i + 1], generation_prompt=False)
        if not full.startswith(end_text) or not end_text.startswith(start_text):
            raise DataError(f"{where}: the chat template is not prefix-consistent; cannot mask the prompt")
        spans.append((len(start_text), len(end_text)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, _b) in enumerate(offsets):
        if any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_sft(tok, rows: Sequence[dict], *, max_length: int) -> List[Dict[str, List[int]]]:
    return [encode_messages(tok, r["messages"], max_length=max_length, where=str(r.get("prompt_id", "")))
            for r in rows]


def encode_pref(tok, rows: Sequence[dict], *, max_length: int) -> List[Dict[str, Dict[str, List[int]]]]:
    return [{"chosen": encode_messages(tok, r["chosen"], max_length=max_length, last_turn_only=True),
             "rejected": encode_messages(tok, r["rejected"], max_length=max_length, last_turn_only=True)}
            for r in rows]


def encode_text(tok, text: str, *, seq_length: int) -> List[Dict[str, List[int]]]:
    """Plain-text pretraining examples: the text's tokens in windows of ``seq_length`` (all supervised)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for s in range(0, max(1, len(ids) - 1), seq_length):
        chunk = ids[s: s + seq_length]
        if len(chunk) > 1:
            out.append({"input_ids": chunk, "labels": list(chunk)})
    return out


def prompt_text(tok, messages: Sequence[dict]) -> str:
    """Templated prompt (every message but the last assistant answer) with the generation prompt."""
    msgs = list(messages)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return _template(tok, msgs, generation_prompt=True)
