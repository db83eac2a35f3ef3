"""`lorasp eval`: score a trained adapter, or the bare base as a reference, on an instruction jsonl.

Every sequence is built as training builds it (lorasp_dist.data): `bos + PROMPT_TEMPLATE(prompt) + response [+ eos]`,
tokenized as one text, so a score reads the same tokens the adapter was trained on. Metrics:
- exact_match: greedy generation from the templated prompt; its first line, stripped and lowercased, must equal the
  response's (or one of `targets`).
- multiple_choice: the summed log-probability of each choice's tokens after the prompt; the argmax is the answer,
  graded by `choice_scores` when the record has them (BIG-bench's multiple_choice_grade), else against `answer_index`.
- loss: mean cross-entropy per response token (eos included, as in training).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lorasp_dist.config import ConfigError
from lorasp_dist.data import PROMPT_TEMPLATE

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
        records.append(r)
    if not records:
        raise EvalError(f"--data = '{path}': no records")
    return records


def normalize(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip().lower() if lines else ""


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


class _Encoder:
    """Token ids exactly as lorasp_dist.data makes them for training."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def prompts(self, records: list[dict]) -> list[list[int]]:
        return [self.bos + ids for ids in self([PROMPT_TEMPLATE.format(prompt=r["prompt"]) for r in records])]

    def continued(self, prompts: list[str], continuations: list[str], eos: bool) -> list[tuple[list[int], int]]:
        """(ids, start) for each prompt + continuation: the continuation's tokens are ids[start:]. The template ends
        in a newline, so the prompt's tokens are a prefix of the whole text's (data.py relies on the same)."""
        heads = self([PROMPT_TEMPLATE.format(prompt=p) for p in prompts])
        wholes = self([PROMPT_TEMPLATE.format(prompt=p) + c for p, c in zip(prompts, continuations)])
        tail = self.eos if eos else []
        return [(self.bos + w + tail, len(self.bos) + len(h)) for h, w in zip(heads, wholes)]


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
def generate(model, enc: _Encoder, records: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of the templated prompts (left-padded batches), decoded without special tokens."""
    prompts, texts = enc.prompts(records), []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[enc.pad] * (width - len(p)) + p for p in chunk], device=_device(model))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=_device(model))
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=enc.pad,
            eos_token_id=enc.eos[0] if enc.eos else None,
        )[:, width:]
        texts += enc.tok.batch_decode(new, skip_special_tokens=True)
    return texts


def evaluate(
    model,
    tokenizer,
    records: list[dict],
    metric: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> dict:
    """{metric, value, n} of `model` on `records`. metric None: multiple_choice when every record has choices,
    else exact_match."""
    if not records:
        raise EvalError("no records to evaluate")
    metric = metric or default_metric(records)
    _check(records, metric)
    enc = _Encoder(tokenizer)
    was_training = model.training
    model.eval()
    try:
        if metric == "exact_match":
            outputs = generate(model, enc, records, max_new_tokens, batch_size)
            hits = [
                normalize(o) in {normalize(t) for t in (r.get("targets") or [r["response"]])}
                for o, r in zip(outputs, records)
            ]
            value = sum(hits) / len(hits)
        elif metric == "multiple_choice":
            pairs = [(r["prompt"], c) for r in records for c in r["choices"]]
            scores = continuation_logprobs(
                model, enc.continued([p for p, _ in pairs], [c for _, c in pairs], eos=False), enc.pad, batch_size
            )
            grades, k = [], 0
            for r in records:
                lp = [s for s, _ in scores[k : k + len(r["choices"])]]
                k += len(r["choices"])
                pick = max(range(len(lp)), key=lp.__getitem__)
                grades.append(r["choice_scores"][pick] if "choice_scores" in r else float(pick == r["answer_index"]))
            value = sum(grades) / len(grades)
        else:
            seqs = enc.continued([r["prompt"] for r in records], [r["response"] for r in records], eos=True)
            scores = continuation_logprobs(model, seqs, enc.pad, batch_size)
            value = -sum(s for s, _ in scores) / max(1, sum(n for _, n in scores))
    finally:
        model.train(was_training)
    return {"metric": metric, "value": value, "n": len(records)}


# ------------------------------------------------------------------------------------------------ the command


def resolve_adapter(path: str | Path) -> Path:
    """A PEFT adapter directory, or a run directory holding one at RUN_DIR/adapter/ (where the engine writes it)."""
    path = Path(path)
    for d in (path, path / "adapter"):
        if (d / "adapter_config.json").is_file():
            return d
    raise EvalError(f"RUN_DIR|ADAPTER = '{path}': no adapter_config.json in it or in its adapter/ folder")


def load_for_eval(adapter: str | Path | None, base: str | Path | None, tokenizer: str | Path | None = None):
    """(model, tokenizer): the base from a local directory (cuda in bf16 if there is one, else CPU in fp32), with the
    PEFT adapter on top unless `adapter` is None. The base defaults to the adapter's base_model_name_or_path, the
    tokenizer to the one saved beside the adapter, else the base's."""
    from lorasp_dist.data import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adapter_dir = resolve_adapter(adapter) if adapter is not None else None
    if base is None:
        if adapter_dir is None:
            raise EvalError("nothing to evaluate: give RUN_DIR|ADAPTER, or --base DIR to score the base alone")
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise EvalError(f"'{adapter_dir}/adapter_config.json' names no base model; pass --base DIR")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise EvalError(f"--base = '{base}': not a local checkpoint directory (no config.json); pass --base DIR")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.bfloat16 if cuda else torch.float32, local_files_only=True
        ).to("cuda" if cuda else "cpu")
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = f"base '{base}'" + (f" with adapter '{adapter_dir}'" if adapter_dir else "")
        raise EvalError(f"cannot load {what}: {first}") from None
    model.eval()
    if tokenizer is not None:
        return model, load_tokenizer(tokenizer, "--tokenizer")
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():  # saved there by training
        return model, load_tokenizer(adapter_dir, "RUN_DIR|ADAPTER")
    return model, load_tokenizer(base, "--base")


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
) -> dict:
    counts = {"--max-examples": max_examples, "--max-new-tokens": max_new_tokens, "--batch-size": batch_size}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise EvalError(f"{flag} = {value}: must be a positive integer")
    records = read_records(data)[:max_examples]
    metric = metric or default_metric(records)
    _check(records, metric)  # before the (slow) model load
    model, tok = load_for_eval(target, base, tokenizer)
    result = evaluate(model, tok, records, metric, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result.update(adapter=str(resolve_adapter(target)) if target else None, data=str(data))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    return result
