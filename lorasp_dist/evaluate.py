"""`lorasp eval`: score a trained adapter, or the bare base as a reference, on an instruction jsonl.

Every sequence is built as training builds it, by lorasp_dist.data.Template: the tokenizer's chat template when it
has one (else `bos + PROMPT_TEMPLATE(prompt)`), so a score reads the same tokens the adapter was trained on. The base
is loaded as training loads it (NF4 4-bit, lorasp_dist.model.load) unless --dense asks for the dense checkpoint.
Metrics:
- exact_match: greedy generation from the prompt; its first non-blank line must equal the response (or one of
  `targets`) after `normalize`, applied to both: lowercased, punctuation deleted, runs of whitespace made one space,
  stripped. Nothing else is forgiven: "cats" and "cat", or "4" and "four", differ.
- multiple_choice: the summed log-probability of each choice's tokens after the prompt; a batch of prompts runs once,
  then all their choices in one batch on the prompts' KV cache. The argmax is the answer, graded by `choice_scores`
  when the record has them (BIG-bench's multiple_choice_grade), else against `answer_index`.
- loss: mean cross-entropy per answer token (the answer as training scores it: with its end of turn or eos).
Per-example predictions (input, prediction, target, correct) go beside the score (`--out X.json` ->
`X.predictions.jsonl`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lorasp_dist.atomic import atomic_write_text
from lorasp_dist.config import ConfigError, ModelConfig, RunConfig, TrainConfig, load_config
from lorasp_dist.data import Template, field_text, load_tokenizer

METRICS = ("exact_match", "multiple_choice", "loss")


class EvalError(ConfigError):
    """Bad eval input: a missing adapter or base, a malformed data file, a metric the records cannot support."""


def read_records(path: str | Path) -> list[dict]:
    """An instruction jsonl: one object per line with string `prompt` and `response`."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--data = '{path}': not a file (an instruction jsonl)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"'{path}' line {n}: malformed JSON: {e.msg}") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("prompt", "response")):
            raise EvalError(f"'{path}' line {n}: expected an object with string `prompt` and `response`")
        records.append({**r, "prompt": field_text(r["prompt"]), "response": field_text(r["response"])})
    if not records:
        raise EvalError(f"--data = '{path}': no records")
    return records


def normalize(text: str) -> str:
    """What exact match compares: the first non-blank line, lowercased, with punctuation (Unicode P*) deleted and
    runs of whitespace made one space, stripped. "U.S.A.!" and " usa" match; "cats" and "cat" do not."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    kept = "".join(c for c in first if not unicodedata.category(c).startswith("P"))
    return re.sub(r"\s+", " ", kept).strip()


def default_metric(records: list[dict]) -> str:
    return "multiple_choice" if all("choices" in r for r in records) else "exact_match"


def _check(records: list[dict], metric: str) -> None:
    if metric not in METRICS:
        raise EvalError(f"--metric = {metric!r}: accepted: {', '.join(METRICS)}")
    if metric != "multiple_choice":
        return
    for i, r in enumerate(records):
        choices, answer = r.get("choices"), r.get("answer_index")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise EvalError(f"record {i}: metric multiple_choice needs `choices` (a list of strings)")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise EvalError(f"record {i}: `answer_index` = {answer!r}: must index one of its {len(choices)} choices")
        scores = r.get("choice_scores", [0.0] * len(choices))
        if not (isinstance(scores, list) and len(scores) == len(choices) and all(_is_number(s) for s in scores)):
            raise EvalError(f"record {i}: `choice_scores` must be a list of {len(choices)} numbers, one per choice")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pad_id(tokenizer) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(
    model, seqs: list[tuple[list[int], int]], pad: int, batch_size: int
) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of ids[start:] given ids[:start], for each (ids, start)."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths together: less padding
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            mask[row, : len(seqs[i][0])] = 1
        ids, mask = ids.to(_device(model)), mask.to(_device(model))
        # Logits only from the earliest scored position on: the vocabulary projection of the prompt is most of the
        # cost (and memory) when prompts are long and continuations short.
        first = min(max(seqs[i][1], 1) for i in idx) - 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits[:, :-1].float()
        token_lp = logits.log_softmax(-1).gather(-1, ids[:, first + 1 :, None])[..., 0]  # log p(ids[t]), t > first
        for row, i in enumerate(idx):
            n, start = len(seqs[i][0]), max(seqs[i][1], 1)
            out[i] = (token_lp[row, start - 1 - first : n - 1 - first].sum().item(), n - start)
    return out


@torch.no_grad()
def choice_logprobs(model, items: list[tuple[list[int], list[list[int]]]], pad: int) -> list[list[float]]:
    """For each (prompt ids, [choice ids, ...]): the summed log-probability of each choice's tokens after the prompt.

    The prompts of `items` run once, left-padded, in one batch; then every choice of every item runs in a second
    batch on its own prompt's KV cache, right-padded (causal attention never lets a token see the padding after it).
    """
    device = _device(model)
    width = max(len(p) for p, _ in items)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in items], device=device)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in items], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt starts at position 0 whatever its padding
    head = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = head.logits[:, -1].float().log_softmax(-1)  # the distribution of each choice's first token
    scores = [[first[i, c[0]].item() if c else 0.0 for c in choices] for i, (_, choices) in enumerate(items)]
    owner = [i for i, (_, choices) in enumerate(items) for _ in choices]
    flat = [c for _, choices in items for c in choices]
    longest = max(len(c) for c in flat)
    if longest < 2:
        return scores
    cache = head.past_key_values
    cache.batch_select_indices(torch.tensor(owner, device=device))
    ids = torch.tensor([c + [pad] * (longest - len(c)) for c in flat], device=device)
    mask = torch.cat([mask[owner], torch.ones_like(ids)], dim=1)
    positions = torch.tensor([[len(items[i][0]) + t for t in range(longest)] for i in owner], device=device)
    lp = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
               use_cache=True).logits[:, :-1].float().log_softmax(-1)
    rest = lp.gather(-1, ids[:, 1:, None])[..., 0]  # log p(ids[t] | prompt, ids[:t]), t >= 1
    k = 0
    for row in scores:
        for j in range(len(row)):
            row[j] += rest[k, : max(0, len(flat[k]) - 1)].sum().item()
            k += 1
    return scores


@torch.no_grad()
def generate(model, template: Template, records: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of the prompts (left-padded batches), decoded without special tokens."""
    tok = template.tok
    prompts, texts, pad = template.prompts([r["prompt"] for r in records]), [], _pad_id(tok)
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=_device(model))
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=template.stop_ids or None,  # eos and the chat template's end of turn
        )[:, width:]
        texts += tok.batch_decode(new, skip_special_tokens=True)
    return texts


def evaluate(
    model,
    tokenizer,
    records: list[dict],
    metric: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    template: str = "auto",
) -> dict:
    """{metric, value, n, template, predictions} of `model` on `records`. metric None: multiple_choice when every
    record has choices, else exact_match. predictions: one {input, prediction, target, correct} per record (loss:
    the record's own loss instead of a prediction)."""
    if not records:
        raise EvalError("no records to evaluate")
    metric = metric or default_metric(records)
    _check(records, metric)
    form = Template(tokenizer, template)
    was_training = model.training
    model.eval()
    try:
        if metric == "exact_match":
            outputs = generate(model, form, records, max_new_tokens, batch_size)
            predictions = []
            for o, r in zip(outputs, records):
                targets = r.get("targets") or [r["response"]]
                correct = normalize(o) in {normalize(t) for t in targets}
                predictions.append({"input": r["prompt"], "prediction": o, "target": targets, "correct": correct})
            value = sum(p["correct"] for p in predictions) / len(predictions)
        elif metric == "multiple_choice":
            predictions, grades, items = [], [], []
            for r in records:  # every choice shares its prompt's tokens (Template.continued keeps them a prefix)
                seqs = form.continued([r["prompt"]] * len(r["choices"]), r["choices"])
                items.append((seqs[0][0][: seqs[0][1]], [ids[n:] for ids, n in seqs]))
            logprobs = []
            for lo in range(0, len(items), batch_size):
                logprobs += choice_logprobs(model, items[lo : lo + batch_size], _pad_id(tokenizer))
            for r, lp in zip(records, logprobs):
                pick = max(range(len(lp)), key=lp.__getitem__)
                grades.append(r["choice_scores"][pick] if "choice_scores" in r else float(pick == r["answer_index"]))
                predictions.append({"input": r["prompt"], "prediction": r["choices"][pick],
                                    "target": r["choices"][r["answer_index"]], "correct": pick == r["answer_index"],
                                    "grade": grades[-1], "choice_logprobs": lp})
            value = sum(grades) / len(grades)
        else:
            seqs = form.encode([r["prompt"] for r in records], [r["response"] for r in records])
            scores = continuation_logprobs(model, seqs, _pad_id(tokenizer), batch_size)
            value = -sum(s for s, _ in scores) / max(1, sum(n for _, n in scores))
            predictions = [{"input": r["prompt"], "prediction": None, "target": r["response"], "correct": None,
                            "loss": -s / max(1, n)} for r, (s, n) in zip(records, scores)]
    finally:
        model.train(was_training)
    return {"metric": metric, "value": value, "n": len(records), "template": form.kind, "predictions": predictions}


# ------------------------------------------------------------------------------------------------ the command


def resolve_adapter(path: str | Path) -> Path:
    """A PEFT adapter directory, or a run directory holding one at RUN_DIR/adapter/ (where the engine writes it)."""
    path = Path(path)
    for d in (path, path / "adapter"):
        if (d / "adapter_config.json").is_file():
            return d
    if (path / "model" / "config.json").is_file():  # lorasp.variant=full writes the whole model, no adapter
        raise EvalError(f"RUN_DIR|ADAPTER = '{path}': a full fine-tune, with no adapter; score its model with "
                        f"`lorasp eval --base {path / 'model'}`")
    raise EvalError(f"RUN_DIR|ADAPTER = '{path}': no adapter_config.json in it or in its adapter/ folder")


def read_adapter(adapter_dir: Path) -> dict:
    """The adapter's config, once both of its files are known to be whole. A damaged adapter is bad input: one line,
    before the base loads, not a traceback from inside peft. The weights must be safetensors (never a pickle)."""
    field = f"RUN_DIR|ADAPTER = '{adapter_dir}'"
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{field}: adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise EvalError(f"{field}: adapter_config.json must hold a JSON object (a PEFT LoRA config)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise EvalError(f"{field}: no adapter_model.safetensors (the adapter's weights) in it")
    try:
        with safe_open(weights, framework="pt") as f:  # the header, checked against the file's size
            f.keys()
    except (OSError, SafetensorError) as e:
        raise EvalError(f"{field}: adapter_model.safetensors is damaged or truncated ({e})") from None
    return config


def _run_config(adapter_dir: Path | None) -> RunConfig | None:
    """The config of the run that trained the adapter (RUN_DIR/config.yaml beside RUN_DIR/adapter), if there is one."""
    if adapter_dir is None or not (adapter_dir.parent / "config.yaml").is_file():
        return None
    return load_config(adapter_dir.parent / "config.yaml")


def _load_base(base: Path, quantized: bool, precision: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    from lorasp_dist.model.load import load_base, read_hf_config

    if not quantized:
        if getattr(read_hf_config(base), "quantization_config", None) is not None:
            raise EvalError(f"--dense: '{base}' is pre-quantized to 4-bit; there is no dense base to load")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True).to(device)
    # As the engine loads it: NF4 linear layers (bf16 compute), the rest in the training precision.
    cfg = RunConfig(model=ModelConfig(path=base, quantize=True), train=TrainConfig(precision=precision))
    model = load_base(cfg, base, device)
    model.config.use_cache = True  # load_base turns it off for training; generation and multiple choice want it
    return model


def load_for_eval(adapter: str | Path | None, base: str | Path | None, tokenizer: str | Path | None = None,
                  dense: bool = False):
    """(model, tokenizer, base_weights "nf4" | "dense"): the base from a local directory, loaded as the run trained
    on it (NF4 4-bit unless the run's model.quantize was off) or dense with `dense`, with the PEFT adapter on top
    unless `adapter` is None. The base defaults to the adapter's base_model_name_or_path. cuda if there is one, else
    CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adapter_dir = resolve_adapter(adapter) if adapter is not None else None
    adapter_config = read_adapter(adapter_dir) if adapter_dir is not None else {}
    if base is None:
        if adapter_dir is None:
            raise EvalError("nothing to evaluate: give RUN_DIR|ADAPTER, or --base DIR to score the base alone")
        base = adapter_config.get("base_model_name_or_path")
        if not base:
            raise EvalError(f"'{adapter_dir}/adapter_config.json' names no base model; pass --base DIR")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise EvalError(f"--base = '{base}': not a local checkpoint directory (no config.json); pass --base DIR")

    from peft import PeftModel  # after the checks: importing it imports bitsandbytes, which has things to say

    run = _run_config(adapter_dir)
    quantized = not dense and (run.model.quantize if run else True)
    precision = run.train.precision if run else "bf16"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = _load_base(base, quantized, precision, device)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
    except EvalError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = f"base '{base}'" + (f" with adapter '{adapter_dir}'" if adapter_dir else "")
        raise EvalError(f"cannot load {what}: {first}") from None
    model.eval()
    print(f"[eval] base: {f'NF4 4-bit as trained, {precision} elsewhere' if quantized else 'dense'} ({base})",
          file=sys.stderr, flush=True)
    weights = "nf4" if quantized else "dense"
    if tokenizer is not None:
        return model, load_tokenizer(tokenizer, "--tokenizer"), weights
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():  # saved there by training
        return model, load_tokenizer(adapter_dir, "RUN_DIR|ADAPTER"), weights
    return model, load_tokenizer(base, "--base"), weights


def predictions_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".predictions.jsonl")


def _check_out(out: Path, data: Path) -> None:
    """--out (and the predictions beside it) may replace an earlier result of this command, never anything else: not
    the --data it reads, not a file of another kind."""
    if out.is_dir():
        raise EvalError(f"--out = '{out}': a directory; give the path of a JSON file to write")
    for path in (out, predictions_path(out)):
        if path.exists() and data.exists() and path.samefile(data):
            raise EvalError(f"--out = '{out}': would write over --data '{data}'; give another path")
    if out.is_file():
        try:
            earlier = json.loads(out.read_text())
        except (ValueError, OSError):
            earlier = None
        if not (isinstance(earlier, dict) and {"metric", "value", "n"} <= earlier.keys()):
            raise EvalError(f"--out = '{out}': exists and is not an earlier `lorasp eval` result; give another path")


def run_eval(
    target: str | None,
    data: str,
    metric: str | None = None,
    base: str | None = None,
    tokenizer: str | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    out: str | None = None,
    dense: bool = False,
    template: str | None = None,
) -> dict:
    counts = {"--max-examples": max_examples, "--max-new-tokens": max_new_tokens, "--batch-size": batch_size}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise EvalError(f"{flag} = {value}: must be a positive integer")
    if out is not None:
        _check_out(Path(out), Path(data))
    records = read_records(data)[:max_examples]
    metric = metric or default_metric(records)
    _check(records, metric)  # before the (slow) model load
    model, tok, base_weights = load_for_eval(target, base, tokenizer, dense=dense)
    if template is None:  # the template the run trained with
        run = _run_config(resolve_adapter(target)) if target else None
        template = run.data.template if run else "auto"
    result = evaluate(model, tok, records, metric, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      template=template)
    predictions = result.pop("predictions")
    result.update(adapter=str(resolve_adapter(target)) if target else None, data=str(data),
                  base_weights=base_weights)
    if out is not None:
        preds = predictions_path(out)
        result["predictions"] = str(preds)
        preds.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(preds, "".join(json.dumps(p) + "\n" for p in predictions))
        atomic_write_text(Path(out), json.dumps(result, indent=2) + "\n")
    return result
