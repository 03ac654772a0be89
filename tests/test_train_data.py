"""Data loaders, schema errors (file + line), prompt masking, collators, sampler, synthetic tasks."""

import json
import random

import pytest

from fdiv_kernels import collate as C
from fdiv_kernels import data as D
from fdiv_kernels.errors import DataError
from fdiv_kernels.train import sampling
from fdiv_kernels.train import synthetic as S
from fdiv_kernels.train.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _sft(p="add 1+2", a="3"):
    return {"prompt": p, "prompt_id": "x", "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}


def _pref(p="add 1+2", c="3", r="4"):
    u = {"role": "user", "content": p}
    return {"prompt": p, "prompt_id": "x", "chosen": [u, {"role": "assistant", "content": c}],
            "rejected": [u, {"role": "assistant", "content": r}], "score_chosen": 9.0, "score_rejected": 2.0}


def test_jsonl_and_parquet_loaders_agree(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [_sft("add 1+2", "3"), _sft("sort 321", "123")]
    jl = _write(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "a.parquet"))
    assert D.load_sft(jl) == D.load_sft(str(tmp_path / "a.parquet")) == rows
    prefs = [_pref(), _pref("reverse abc", "cba", "abc")]
    pq.write_table(pa.Table.from_pylist(prefs), str(tmp_path / "p.parquet"))
    assert D.load_pref(str(tmp_path / "p.parquet")) == prefs


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "invalid JSON"),
    (json.dumps({"prompt": "x"}), "missing key 'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), "string 'role' and 'content'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_sft_rows_name_file_and_line(tmp_path, bad, needle):
    path = _write(tmp_path / "sft.jsonl", [_sft(), "", bad])  # the bad row is on line 3
    with pytest.raises(DataError) as e:
        D.load_sft(path)
    assert f"{path}:3:" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r.pop("rejected"), "missing key 'rejected'"),
    (lambda r: r["rejected"][0].update(content="other prompt"), "share the messages"),
    (lambda r: r["chosen"].pop(), "must end with an assistant message"),
    (lambda r: r.update(score_chosen="high"), "'score_chosen' must be a number"),
])
def test_malformed_pref_rows_name_file_and_line(tmp_path, mutate, needle):
    bad = json.loads(json.dumps(_pref()))  # no shared message objects
    mutate(bad)
    path = _write(tmp_path / "pref.jsonl", [_pref(), bad])
    with pytest.raises(DataError) as e:
        D.load_pref(path)
    assert f"{path}:2:" in str(e.value) and needle in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        D.load_sft(str(tmp_path / "nope.jsonl"))


def test_prompt_tokens_are_masked(tok):
    enc = D.encode_messages(tok, _sft("add 12+5", "17")["messages"], max_length=64)
    ids, labels = enc["input_ids"], enc["labels"]
    text = tok.decode(ids)
    assert text == "<s><|user|>add 12+5<|assistant|>17</s>"
    supervised = [i for i, lab in zip(ids, labels) if lab != C.IGNORE_INDEX]
    assert tok.decode(supervised) == "17</s>"  # answer and end-of-turn only
    assert all(lab in (C.IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert labels[: len(ids) - 3] == [C.IGNORE_INDEX] * (len(ids) - 3)


def test_multi_turn_supervises_every_assistant_turn_and_last_only_for_pairs(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "add 1+1"},
            {"role": "assistant", "content": "2"}]
    enc = D.encode_messages(tok, msgs, max_length=128)
    sup = tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert sup == "yo</s>2</s>"
    enc = D.encode_messages(tok, msgs, max_length=128, last_turn_only=True)
    assert tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]) == "2</s>"


def test_truncation_and_right_padding(tok):
    long = D.encode_messages(tok, _sft("reverse abcdefghij", "jihgfedcba")["messages"], max_length=20)
    short = D.encode_messages(tok, _sft("add 1+2", "3")["messages"], max_length=20)
    assert len(long["input_ids"]) == 20 and len(long["labels"]) == 20
    b = C.collate([long, short], pad_id=tok.pad_token_id)
    n = len(short["input_ids"])
    assert b["input_ids"].shape == (2, 20)
    assert b["attention_mask"][1].tolist() == [1] * n + [0] * (20 - n)
    assert (b["input_ids"][1, n:] == tok.pad_token_id).all() and (b["labels"][1, n:] == -100).all()
    assert b["input_ids"][1, :n].tolist() == short["input_ids"]
    pairs = C.collate_pairs(D.encode_pref(tok, [_pref(), _pref("sort 31", "13", "31")], max_length=32),
                            pad_id=tok.pad_token_id)
    assert pairs["input_ids"].shape[0] == 4
    assert tok.decode([i for i, lab in zip(pairs["input_ids"][2].tolist(), pairs["labels"][2].tolist())
                       if lab != -100]) == "4</s>"  # row B + 0 is the first pair's rejected answer


def test_epoch_sampler_is_a_pure_function_of_the_step():
    s1, s2 = sampling.EpochSampler(10, 4, seed=3), sampling.EpochSampler(10, 4, seed=3)
    seq = [s1.batch(k) for k in range(5)]
    assert [s2.batch(k) for k in reversed(range(5))][::-1] == seq
    flat = [i for b in seq for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert sampling.shard([0, 1, 2, 3], rank=1, world_size=2) == [2, 3]
    with pytest.raises(ValueError, match="divisible"):
        sampling.shard([0, 1, 2], rank=0, world_size=2)


def test_synthetic_answers_checker_and_near_misses():
    rng = random.Random(0)
    for task in S.TASKS:
        for _ in range(50):
            p = S.make_problem(task, rng)
            assert S.check_answer(p["prompt"], p["answer"]) and S.check_answer(p["prompt"], f" {p['answer']} ")
            assert not S.check_answer(p["prompt"], S.near_miss(p, rng))
    assert S.solve("add 23+45") == "68" and S.solve("reverse abc") == "cba"
    assert S.solve("sort 5391") == "1359" and S.solve("count a in abaca") == "3"
    with pytest.raises(ValueError):
        S.solve("what is love")


def test_generated_dataset_has_the_schemas_and_disjoint_held_out(tmp_path):
    paths = S.generate_dataset(str(tmp_path), n_sft=40, n_pref=20, n_eval=12, n_pretrain=10, seed=1)
    sft, pref = D.load_sft(paths["sft_train"]), D.load_pref(paths["dpo_train"])
    ev, ev_pref = D.load_sft(paths["eval_prompts"]), D.load_pref(paths["eval_pref"])
    assert len(sft) == 40 and len(pref) == 20 and len(ev) == 12 and len(ev_pref) == 12
    held = {r["prompt"] for r in ev}
    assert not held & ({r["prompt"] for r in sft} | {r["prompt"] for r in pref})
    for r in pref:
        assert S.check_answer(r["prompt"], r["chosen"][-1]["content"])
        assert not S.check_answer(r["prompt"], r["rejected"][-1]["content"])
        assert set(r) == {"prompt", "prompt_id", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert set(sft[0]) == {"prompt", "prompt_id", "messages"}
    assert open(paths["pretrain"]).read().startswith("Q: ")


# ----------------------------------------------------------------------------------------------
# `datasets` data sets (issue 26, item 10): save_to_disk directories, local data set folders with
# splits, Hub ids. No hub access here: the local forms run the real datasets code paths
# (load_from_disk, load_dataset on a folder); Hub ids are checked for their error messages.
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return datasets


def _sft_rows(n):
    return [_sft(f"add {i}+1", str(i + 1)) for i in range(n)]


def test_save_to_disk_directories_are_read_with_datasets(tmp_path, hf_datasets):
    rows = _sft_rows(5)
    one = hf_datasets.Dataset.from_list(rows)
    one.save_to_disk(str(tmp_path / "one"))
    hf_datasets.DatasetDict({"train_sft": one, "test_sft": one.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert D.load_sft(str(tmp_path / "one")) == rows
    assert D.load_sft(f"{tmp_path / 'dd'}:test_sft") == rows[:2]
    with pytest.raises(DataError, match=r"dd: name a split: .*dd:SPLIT with SPLIT one of train_sft, test_sft"):
        D.load_sft(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd:valid: no split 'valid'"):
        D.load_sft(f"{tmp_path / 'dd'}:valid")
    bad = dict(rows[1], messages=[{"role": "user", "content": "no answer"}])
    hf_datasets.Dataset.from_list([rows[0], bad]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad'}:2: 'messages' has no assistant message"):
        D.load_sft(str(tmp_path / "bad"))


def test_a_local_parquet_folder_with_splits_goes_through_load_dataset(tmp_path, hf_datasets):
    """The layout of a Hub data set's snapshot: data/<split>-0000k-of-0000n.parquet shards."""
    rows = _sft_rows(6)
    ds = hf_datasets.Dataset.from_list(rows)
    (tmp_path / "ultrachat" / "data").mkdir(parents=True)
    for k, part in enumerate((range(0, 3), range(3, 6))):
        ds.select(part).to_parquet(str(tmp_path / "ultrachat" / "data" / f"train_sft-0000{k}-of-00002.parquet"))
    ds.select(range(2)).to_parquet(str(tmp_path / "ultrachat" / "data" / "test_sft-00000-of-00001.parquet"))
    folder = str(tmp_path / "ultrachat")
    assert D.load_sft(f"{folder}:train_sft") == rows
    assert D.load_sft(f"{folder}:train_sft[:4]") == rows[:4]  # a datasets slice
    with pytest.raises(DataError, match=r"name a split: .*ultrachat:SPLIT with SPLIT one of test_sft, train_sft"):
        D.load_sft(folder)
    with pytest.raises(DataError, match=r"ultrachat:dev: datasets cannot read it \(Unknown split"):
        D.load_sft(f"{folder}:dev")
    # a flat folder of files is still read file by file, as before
    flat = tmp_path / "flat"
    flat.mkdir()
    ds.to_parquet(str(flat / "a.parquet"))
    assert D.load_sft(str(flat)) == rows


def test_hub_ids_need_a_split_and_a_missing_file_stays_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"HuggingFaceH4/ultrachat_200k: no such file or directory, and a "
                                          r"Hugging Face Hub data set needs a split: HuggingFaceH4/ultrachat_200k:SPLIT"):
        D.load_sft("HuggingFaceH4/ultrachat_200k")
    with pytest.raises(DataError, match=r"data/sft.jsonl: no such file$"):
        D.load_sft("data/sft.jsonl")
    assert D.hub_id("HuggingFaceH4/ultrachat_200k") and D.hub_id("gpt2")
    assert not any(D.hub_id(p) for p in ("/data/x", "./x", "~/x", "runs/demo/sft/final", "a b/c"))
