"""lorasp_dist.data on real files, a real sentencepiece model and the real chatterbot-corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaTokenizer

from lorasp_dist import cli
from lorasp_dist.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from lorasp_dist.data import (
    IGNORE_INDEX,
    DataError,
    build_datasets,
    builtin_corpus_dir,
    check_batch_fits,
    ensure_tokenizer,
    global_order,
    load_records,
    micro_batch_indices,
    train_tokenizer,
)

QA = [{"prompt": f"What is item number {i}?", "response": f"Item {i} is a thing of kind {i % 7}."} for i in range(40)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_tokenizer(DataConfig(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1024)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return LlamaTokenizer.from_pretrained(tok_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cfg(tmp_path: Path, train: dict | None = None, **data) -> RunConfig:
    return RunConfig(data=DataConfig(**data), train=TrainConfig(output_dir=tmp_path / "runs", **(train or {})))


# ---------------------------------------------------------------------------------------------------------- records


def test_builtin_corpus_both_modes():
    assert (builtin_corpus_dir() / "ai.yml").is_file()
    text = load_records(DataConfig(mode="text"))
    qa = load_records(DataConfig(mode="instruction"))
    assert text.column_names == ["text"] and len(text) > 1000
    assert qa.column_names == ["prompt", "response"] and len(qa) > len(text)  # long conversations give several pairs
    assert "\n" in text[0]["text"] and all(qa[0].values())
    assert "chatterbot_corpus" not in sys.modules  # read as data files, never imported


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "txt", "dir"])
def test_local_formats(tmp_path, kind):
    rows = [{"text": f"document {i}\nwith two lines"} for i in range(5)]
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:  # paragraphs (blank-line separated) are the documents of a text corpus
        path = tmp_path / "corpus"
        path.mkdir()
        (path / "a.txt").write_text("\n\n".join(r["text"] for r in rows[:3]) + "\n")
        (path / "b.txt").write_text("\n\n\n".join(r["text"] for r in rows[3:]))
        (path / "ignored.md").write_text("not text data")
        if kind == "txt":
            path = path / "a.txt"
            rows = rows[:3]
    assert load_records(DataConfig(path=path)).to_list() == rows


def test_named_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": r["prompt"], "a": r["response"], "id": 1} for r in QA])
    records = load_records(DataConfig(path=path, mode="instruction", prompt_column="q", response_column="a"))
    assert records.to_list() == QA


# -------------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_trains_and_round_trips(tok_dir, tok, tmp_path, capsys):
    assert len(tok) == 1024 and (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id is None
    text = "What is AI?\nArtificial Intelligence: 42 machines, naïve café ☃."  # unseen characters fall back to bytes
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    auto = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    # Deterministic: a second training writes the same model, here through the CLI, which refuses to overwrite a
    # directory that holds files (as prepare-base does) unless --force is given.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "mine.txt").write_text("keep me")
    train = ["tokenizer", "train", "--out", str(tmp_path / "again"), "--vocab-size", "1024"]
    assert cli.main(train) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "again" / "mine.txt").read_text() == "keep me"
    assert cli.main([*train, "--force"]) == 0
    assert not (tmp_path / "again" / "mine.txt").exists()
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_ensure_tokenizer_trains_once_then_reuses(tmp_path, tok_dir):
    cfg = run_cfg(tmp_path, vocab_size=512)
    first = ensure_tokenizer(cfg)
    (cache,) = (tmp_path / "runs" / ".cache").iterdir()
    stamp = (cache / "tokenizer.model").stat().st_mtime_ns
    assert len(first) == 512 and len(ensure_tokenizer(cfg)) == 512
    assert (cache / "tokenizer.model").stat().st_mtime_ns == stamp
    assert len(ensure_tokenizer(run_cfg(tmp_path, tokenizer=tok_dir))) == 1024


# ---------------------------------------------------------------------------------------------------------- packing


def test_text_packing(tmp_path, tok):
    cfg = run_cfg(tmp_path, seq_len=64)
    train, val = build_datasets(cfg, tok)
    assert train.input_ids.shape == train.labels.shape == (len(train), 64) and len(val) > 0
    assert train.input_ids.dtype == torch.long and set(train[0]) == {"input_ids", "labels"}
    scored = train.labels != IGNORE_INDEX
    assert torch.equal(train.labels[scored], train.input_ids[scored])
    assert torch.equal(~scored, train.input_ids == tok.bos_token_id)  # only bos is never a target
    assert train[[0, 2]]["input_ids"].shape == (2, 64)


def test_instruction_labels_mask_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    train, _ = build_datasets(run_cfg(tmp_path, path=path, mode="instruction", seq_len=32, val_fraction=0), tok)
    ids, labels = train.input_ids.flatten(), train.labels.flatten()
    scored = labels != IGNORE_INDEX
    assert torch.equal(labels[scored], ids[scored])
    assert "Question" in tok.decode(ids) and "Item 3 is" in tok.decode(ids)
    shown = tok.decode(ids[scored])
    assert "Question" not in shown and "What is" not in shown
    assert shown.count(" is a thing of kind ") >= 35  # every response but the cut tail's
    assert tok.eos_token_id in ids[scored]  # the model learns where an answer ends


def test_deterministic_by_seed(tmp_path, tok):
    a, va = build_datasets(run_cfg(tmp_path, seq_len=64, seed=1), tok)
    b, vb = build_datasets(run_cfg(tmp_path, seq_len=64, seed=1), tok)
    c, _ = build_datasets(run_cfg(tmp_path, seq_len=64, seed=2), tok)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(va.input_ids, vb.input_ids)
    assert not torch.equal(a.input_ids[: len(c)], c.input_ids[: len(a)])
    assert torch.equal(global_order(100, 3, 0), global_order(100, 3, 0))
    assert not torch.equal(global_order(100, 3, 0), global_order(100, 4, 0))
    assert not torch.equal(global_order(100, 3, 0), global_order(100, 3, 1))


def test_small_val_split_gets_a_record(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"a short document number {i}"} for i in range(3)])
    train, val = build_datasets(run_cfg(tmp_path, path=path, seq_len=4, val_fraction=0.01), tok)
    assert len(train) > len(val) > 0


# ------------------------------------------------------------------------------------------------------ sample order


@pytest.mark.parametrize("sample_pos", [0, 8, 44])  # 44: the step crosses into the next epoch
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step_samples_independent_of_world_size(sample_pos, grad_accum):
    def step(micro: int, world: int) -> list[int]:
        per_rank = [micro_batch_indices(50, 7, sample_pos, micro, r, world, grad_accum) for r in range(world)]
        assert all(len(mbs) == grad_accum and all(len(mb) == micro for mb in mbs) for mbs in per_rank)
        return sorted(i for mbs in per_rank for mb in mbs for i in mb)

    assert step(4, 1) == step(2, 2) == step(1, 4)


def test_one_epoch_visits_every_row_once():
    seen = [i for pos in range(0, 48, 8) for r in range(2) for mb in micro_batch_indices(48, 0, pos, 2, r, 2, 2)
            for i in mb]
    assert sorted(seen) == list(range(48))


# ------------------------------------------------------------------------------------------------------- bad input


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"^data.path = '.*missing.jsonl': not found$"):
        load_records(DataConfig(path=tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n")
    for name in ("empty.jsonl", "blank.txt"):
        with pytest.raises(DataError, match=r"^data.path = '.*': the dataset is empty$"):
            load_records(DataConfig(path=tmp_path / name))
    write_jsonl(tmp_path / "nulls.jsonl", [{"text": None}, {"text": " "}])
    with pytest.raises(DataError, match="the dataset is empty"):
        load_records(DataConfig(path=tmp_path / "nulls.jsonl"))
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported extension '.csv'; accepted: .jsonl, .json, .parquet"):
        load_records(DataConfig(path=tmp_path / "d.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="cannot be read as jsonl"):
        load_records(DataConfig(path=tmp_path / "bad.jsonl"))
    (tmp_path / "nodata").mkdir()
    with pytest.raises(DataError, match="a directory without"):
        load_records(DataConfig(path=tmp_path / "nodata"))


def test_wrong_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA[:2])
    with pytest.raises(DataError) as e:
        load_records(DataConfig(path=path, text_column="txt"))
    assert str(e.value) == f"data.text_column = 'txt': not a column of {path}; columns: prompt, response"
    with pytest.raises(DataError, match=r"^data.response_column = 'answer': not a column"):
        load_records(DataConfig(path=path, mode="instruction", response_column="answer"))


def test_sizes_that_do_not_fit(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(12)])
    with pytest.raises(DataError, match=r"^data.seq_len = 4096: the training split has only \d+ tokens"):
        build_datasets(run_cfg(tmp_path, path=path, seq_len=4096), tok)
    with pytest.raises(DataError, match=r"^data.val_fraction = 0.1: the validation split has \d+ tokens"):
        build_datasets(run_cfg(tmp_path, {"eval_every": 5}, path=path, seq_len=64, val_fraction=0.1), tok)
    cfg = run_cfg(tmp_path, {"micro_batch_size": 64}, path=path, seq_len=8)
    train, _ = build_datasets(cfg, tok)
    with pytest.raises(DataError) as e:
        check_batch_fits(train, cfg)
    assert str(e.value) == f"train.micro_batch_size = 64: larger than the training split ({len(train)} sequences " \
        "of data.seq_len=8)"
    with pytest.raises(ConfigError, match=r"data.seq_len = 0: must be greater than 0"):
        load_config(None, ["data.seq_len=0"])
    with pytest.raises(DataError, match=r"^data.vocab_size = 100: cannot train a tokenizer"):
        train_tokenizer(DataConfig(path=path), tmp_path / "tok", vocab_size=100)
    with pytest.raises(DataError, match=r"^data.tokenizer = '.*': not found"):
        ensure_tokenizer(run_cfg(tmp_path, tokenizer=tmp_path / "no-such-tokenizer"))


def test_cli_bad_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["tokenizer", "train", f"data.path={missing}", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data.path = '{missing}': not found\n"
    assert not (tmp_path / "tok").exists()
