"""Data: local files or the built-in corpus -> token ids -> rows of exactly `seq_len` tokens, and the sample order.

Records come from jsonl/json/parquet/text files through `datasets`, or from chatterbot-corpus (English) read from the
installed package. The tokenizer is the checkpoint's own, or a LLaMA-style sentencepiece model trained on the data.
- `text` mode: every document is `bos + tokens + eos`; the documents of a split are concatenated in a seeded order
  and cut into rows (the tail is dropped). Every token but bos is scored.
- `instruction` mode: each record is rendered by `Template` (the tokenizer's chat template, or PROMPT_TEMPLATE for a
  base model) and only the answer is scored. An example is never split: whole examples are packed into rows in a
  seeded order, the rest of a row is padding, and position ids restart at every example, which makes transformers
  mask attention block-diagonally (no example sees another). One longer than seq_len loses the start of its prompt.
Everything here is deterministic by seed and independent of the world size.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import sentencepiece as spm
import torch
import yaml
from transformers import AutoTokenizer, LlamaTokenizer

from lorasp_dist.atomic import atomic_dir
from lorasp_dist.config import DataConfig, RunConfig
from lorasp_dist.inputs import DataError, builtin_corpus_dir, data_files, has_tokenizer

PROMPT_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"  # for tokenizers without a chat template
IGNORE_INDEX = -100  # labels never scored: bos, prompt and padding tokens
BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}  # our format -> datasets builder

# LLaMA's recipe at small scale: BPE, byte fallback (no unknown characters), digits split, text kept as is.
# One thread, no sampling and no shuffling make the model a pure function of the data.
SPM_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    character_coverage=0.9995,  # rarer characters become bytes instead of using up a small vocabulary
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    input_sentence_size=200_000,  # lines; the first ones, since shuffling is off
    shuffle_input_sentence=False,
    minloglevel=2,
)
SPM_VERSION = 1  # part of the tokenizer cache key: bump when SPM_SETTINGS or the training text change


@dataclass
class PackedDataset:
    """Rows of exactly seq_len tokens. Labels are not shifted (HF causal LMs shift inside); -100 is never scored.
    Position ids restart at 0 where an example starts: given position ids and no attention mask, transformers
    builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so examples never attend
    to each other."""

    input_ids: torch.Tensor  # [N, seq_len] long
    labels: torch.Tensor  # [N, seq_len] long
    position_ids: torch.Tensor  # [N, seq_len] long
    stats: dict = dataclass_field(default_factory=dict)  # what packing did: examples, truncated, dropped, scored tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i) -> dict[str, torch.Tensor]:
        # i may be an int or a list/tensor of indices (a whole micro-batch at once).
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "position_ids": self.position_ids[i]}


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens a causal LM's loss scores in `labels`: the model shifts them, so position 0 never counts."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------------------- records


# libyaml's parser where PyYAML was built with it: the pure-Python one spends ~0.8 s of every rank's start on the
# built-in corpus (27 files).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _builtin_records(mode: str) -> dict[str, list]:
    conversations = []
    for f in sorted(builtin_corpus_dir().glob("*.yml")):
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        conversations += [[str(turn) for turn in c] for c in doc.get("conversations") or []]
    if mode == "text":
        return {"text": ["\n".join(c) for c in conversations]}
    pairs = [(q, a) for c in conversations for q, a in zip(c, c[1:])]  # every turn answers the one before it
    return {"prompt": [q for q, _ in pairs], "response": [a for _, a in pairs]}


def _is_blank(path: Path) -> bool:
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:  # datasets wraps the parser's error in a generic one
        e = e.__cause__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_files(data: DataConfig, files: list[Path], fmt: str) -> dict[str, list]:
    shown = repr(str(data.path))
    if all(_is_blank(f) for f in files):
        raise DataError(f"data.path = {shown}: the dataset is empty")
    # Text: one record per paragraph (blank-line separated), so line-wrapped prose stays whole.
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    import datasets  # here, not at the top: a run on the built-in corpus never needs it (with pandas, pyarrow)

    try:
        ds = datasets.load_dataset(BUILDERS[fmt], data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as e:  # malformed input surfaces as many exception types
        raise DataError(f"data.path = {shown}: cannot be read as {fmt}: {_root_cause(e)}") from None
    text_mode = data.mode == "text"
    fields = {"text": "text_column"} if text_mode else {"prompt": "prompt_column", "response": "response_column"}
    for field in fields.values():
        column = getattr(data, field)
        if column not in ds.column_names:
            raise DataError(f"data.{field} = {column!r}: not a column of {data.path}; "
                            f"columns: {', '.join(ds.column_names)}")
    table = ds.select_columns([getattr(data, f) for f in fields.values()]).to_dict()
    return {name: table[getattr(data, field)] for name, field in fields.items()}


def field_text(value) -> str:
    """A record's field as training renders it, and `lorasp eval` too: leading and trailing newlines dropped (a
    jsonl exported line by line often ends each field with one, which the template would otherwise score)."""
    return str(value).strip("\n")


def load_records(data: DataConfig) -> dict[str, list[str]]:
    """The records of `data`, by column: `text` (text mode) or `prompt` and `response` (instruction mode).

    data.path None: the built-in corpus. Otherwise a .jsonl/.json/.parquet/.txt/.text file (data.format "auto" picks
    by extension) or a directory of such files. Records with a missing or blank field are dropped.
    """
    files, fmt = data_files(data)
    table = _builtin_records(data.mode) if data.path is None else _read_files(data, files, fmt)
    keep = [i for i, row in enumerate(zip(*table.values())) if all(v is not None and str(v).strip() for v in row)]
    table = {name: [field_text(values[i]) for i in keep] for name, values in table.items()}
    if not keep:
        raise DataError(f"data.path = {str(data.path)!r}: the dataset is empty")
    return table


def _documents(records: dict[str, list], mode: str) -> list[str]:
    """The text of each record that a sentencepiece tokenizer is trained on (such a tokenizer has no chat template,
    so instruction records are read in PROMPT_TEMPLATE)."""
    if mode == "text":
        return records["text"]
    return [PROMPT_TEMPLATE.format(prompt=p) + r for p, r in zip(records["prompt"], records["response"])]


# --------------------------------------------------------------------------------------------------------- template


TEMPLATE_DATE = "26 Jul 2024"  # the date Llama 3.x's own template falls back to
ANSWER = "LORASPANSWER7F3A"  # a stand-in response (plain letters: templates may trim or escape others)


class Template:
    """How an instruction example becomes tokens, for training and for `lorasp eval` alike.

    chat (the tokenizer has a chat template, or data.template = chat): the template renders a user turn holding the
    prompt, then the assistant's turn holding the response, with the model's own special tokens; the prompt is the
    render of the user turn with the generation prompt (`apply_chat_template(..., add_generation_prompt=True)`), the
    answer is the rest (the response and the template's end of turn). What the template writes in the assistant's
    turn before any response (Qwen3's empty `<think>` block) belongs to the prompt: given, never scored or generated.
    plain: `bos + PROMPT_TEMPLATE(prompt)` is the prompt and `response + eos` the answer. Only the answer is scored.
    `stop_ids`: where generation ends, eos and the chat template's end of turn (`<|im_end|>`, `<|eot_id|>`).
    """

    def __init__(self, tokenizer, kind: str = "auto"):
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if kind == "chat" and not has_chat:
            raise DataError("data.template = 'chat': the tokenizer has no chat template; accepted: auto, plain")
        self.tok, self.chat = tokenizer, kind == "chat" or (kind == "auto" and has_chat)
        self.kind = "chat" if self.chat else "plain"
        # A chat template writes the model's special tokens itself; the plain template is framed by bos and eos.
        self.bos = [] if self.chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.eos = [] if self.chat or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.preamble, end_of_turn = self._frame() if self.chat else ("", "")
        end = _encode(tokenizer, [end_of_turn])[0][:1] if end_of_turn else []
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.stop_ids = sorted({tokenizer.eos_token_id, *(i for i in end if i in special)} - {None})

    def _frame(self) -> tuple[str, str]:
        """What the chat template writes in the assistant's turn before a response, and after it."""
        turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ANSWER}]
        whole, head = self._render(turns), self._render(turns[:1], generation_prompt=True)
        at = whole.find(ANSWER)
        if not whole.startswith(head) or at < len(head):
            return "", ""  # text() says what is wrong with such a template
        return whole[len(head):at], whole[at + len(ANSWER):]

    def _render(self, turns: list[dict], generation_prompt: bool = False) -> str:
        # A fixed date for templates that write today's into the system turn (Llama 3.x, through strftime_now):
        # otherwise training and `lorasp eval` on another day would see other prompts.
        return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt,
                                            date_string=TEMPLATE_DATE)

    def prompt_text(self, prompt: str) -> str:
        if not self.chat:
            return PROMPT_TEMPLATE.format(prompt=prompt)
        user = [{"role": "user", "content": prompt}]
        return self._render(user, generation_prompt=True) + self.preamble

    def text(self, prompt: str, response: str) -> str:
        """The whole example as text (without the plain template's bos and eos, which are ids)."""
        if not self.chat:
            return PROMPT_TEMPLATE.format(prompt=prompt) + response
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = self._render(turns)
        if not text.startswith(self.prompt_text(prompt)):
            raise DataError("data.template = 'chat': the tokenizer's chat template does not render the prompt as the "
                            "start of the conversation; use data.template=plain")
        return text

    def encode(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], int]]:
        """(ids, n_prompt) of each whole example: its token ids, of which the first n_prompt are the prompt."""
        wholes = [self.text(p, r) for p, r in zip(prompts, responses)]
        return self._split([self.prompt_text(p) for p in prompts], wholes, self.eos)

    def continued(self, prompts: list[str], continuations: list[str]) -> list[tuple[list[int], int]]:
        """(ids, n_prompt) of each prompt followed by a bare continuation (a multiple-choice option, no end)."""
        heads = [self.prompt_text(p) for p in prompts]
        return self._split(heads, [h + c for h, c in zip(heads, continuations)], [])

    def prompts(self, prompts: list[str]) -> list[list[int]]:
        """The ids a model generates an answer from."""
        return [self.bos + ids for ids in _encode(self.tok, [self.prompt_text(p) for p in prompts])]

    def _split(self, heads: list[str], wholes: list[str], tail: list[int]) -> list[tuple[list[int], int]]:
        out = []
        for head, whole, h, w in zip(heads, wholes, _encode(self.tok, heads), _encode(self.tok, wholes)):
            if w[: len(h)] != h:  # a token spans the boundary: encode the answer on its own, as generation sees it
                w = h + _encode(self.tok, [whole[len(head):]])[0]
            out.append((self.bos + w + tail, len(self.bos) + len(h)))
        return out


# -------------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(data: DataConfig, out_dir: str | Path, vocab_size: int) -> Path:
    """Train a LLaMA-style sentencepiece BPE model on `data`; write it to out_dir atomically and return out_dir.

    out_dir gets `tokenizer.model` (sentencepiece: unk=0, bos=1, eos=2, no pad, byte fallback) plus `tokenizer.json`
    and `tokenizer_config.json`, so both `LlamaTokenizer.from_pretrained(out_dir)` and `AutoTokenizer` load it.
    """
    out_dir = Path(out_dir)
    if vocab_size <= 0:
        raise DataError(f"data.vocab_size = {vocab_size}: must be > 0")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"tokenizer output {str(out_dir)!r}: exists and is not a directory")
    docs = _documents(load_records(data), data.mode)
    # LLaMA-style: pieces never span a newline, which is encoded as the byte <0x0A>.
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       **SPM_SETTINGS)
    except RuntimeError as e:
        reason = str(e).split("] ", 1)[-1]  # drop sentencepiece's source location
        source = data.path or "the built-in corpus"
        raise DataError(f"data.vocab_size = {vocab_size}: cannot train a tokenizer on {source}: {reason}") from None

    with atomic_dir(out_dir, replace=True) as tmp:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        LlamaTokenizer.from_pretrained(tmp).save_pretrained(tmp)
    return out_dir


def load_tokenizer(path: str | Path, field: str = "data.tokenizer", trust_remote_code: bool = False):
    """A transformers tokenizer from a local directory: HF tokenizer files, or a bare sentencepiece tokenizer.model."""
    path, shown = Path(path), repr(str(path))
    if not path.is_dir():
        raise DataError(f"{field} = {shown}: not found (a directory with tokenizer files)")
    try:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        if (path / "tokenizer.model").is_file():
            # AutoTokenizer would guess the class of a bare sentencepiece model and encode differently.
            return LlamaTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{field} = {shown}: cannot load the tokenizer: {_root_cause(e)}") from None
    raise DataError(f"{field} = {shown}: no tokenizer files (tokenizer.json, tokenizer_config.json or tokenizer.model)")


def _tokenizer_cache_key(data: DataConfig) -> str:
    files, fmt = data_files(data)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]  # retrain if the data changes
    columns = (data.text_column,) if data.mode == "text" else (data.prompt_column, data.response_column)
    key = json.dumps([SPM_VERSION, fmt, data.mode, columns, data.vocab_size, stats])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_tokenizer(cfg: RunConfig):
    """The run's tokenizer: data.tokenizer, else the checkpoint's own, else one trained on the data (cached).

    The cache lives in `train.output_dir/.cache/tokenizer-<hash of data and vocab>`. Ranks may race to train it:
    training is deterministic and the write is atomic, so any of them leaves the same files.
    """
    if cfg.data.tokenizer is not None:
        return load_tokenizer(cfg.data.tokenizer, "data.tokenizer", cfg.model.trust_remote_code)
    if cfg.model.path is not None and has_tokenizer(cfg.model.path):
        return load_tokenizer(cfg.model.path, "model.path", cfg.model.trust_remote_code)
    cache = cfg.train.output_dir / ".cache" / f"tokenizer-{_tokenizer_cache_key(cfg.data)}"
    if not (cache / "tokenizer_config.json").is_file():
        train_tokenizer(cfg.data, cache, cfg.data.vocab_size)
    return load_tokenizer(cache, "data.tokenizer")


# ---------------------------------------------------------------------------------------------------------- packing


def _generator(*key: object) -> torch.Generator:
    """A torch generator seeded by `key` (e.g. seed, epoch): well mixed, any ints, the same on every machine."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def _text_rows(records: dict[str, list], rows: list[int], tokenizer, seq_len: int) -> PackedDataset:
    """Text mode: bos + document + eos, concatenated and cut into rows; every token but bos is scored."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    input_ids, labels = [], []
    for doc in _encode(tokenizer, [records["text"][i] for i in rows]):
        input_ids += bos + doc + eos
        labels += [IGNORE_INDEX] * len(bos) + doc + eos
    n = len(input_ids) // seq_len  # the tail that does not fill a row is dropped
    ids, lab = (torch.tensor(x[: n * seq_len], dtype=torch.long).view(n, seq_len) for x in (input_ids, labels))
    stats = {"examples": len(rows), "tokens": len(input_ids), "scored_tokens": int(scored_tokens(lab))}
    return PackedDataset(ids, lab, torch.arange(seq_len).expand(n, seq_len).contiguous(), stats)


def _instruction_rows(records: dict[str, list], rows: list[int], template: Template, seq_len: int,
                      pad: int) -> PackedDataset:
    """Instruction mode: whole examples packed greedily, in order, into rows of seq_len; a row is closed (padded,
    unscored) when the next example does not fit. An example longer than seq_len keeps its answer and the end of its
    prompt; one whose answer alone leaves no room for a prompt token is dropped."""
    examples = template.encode([records["prompt"][i] for i in rows], [records["response"][i] for i in rows])
    packed: list[tuple[list[int], list[int], list[int]]] = []  # (ids, labels, positions) of each row
    ids, labels, positions = [], [], []
    truncated = dropped = total = 0

    def close_row():
        n = seq_len - len(ids)  # the padding is one more "example": positions restart, nothing is scored
        packed.append((ids + [pad] * n, labels + [IGNORE_INDEX] * n, positions + list(range(n))))

    for example, n_prompt in examples:
        if len(example) - n_prompt >= seq_len:  # the answer needs a token of context before it
            dropped += 1
            continue
        if len(example) > seq_len:
            cut = len(example) - seq_len
            example, n_prompt = example[cut:], n_prompt - cut
            truncated += 1
        if len(ids) + len(example) > seq_len:
            close_row()
            ids, labels, positions = [], [], []
        total += len(example)
        ids += example
        labels += [IGNORE_INDEX] * n_prompt + example[n_prompt:]
        positions += list(range(len(example)))
    if ids:
        close_row()
    tensors = [torch.tensor([row[k] for row in packed], dtype=torch.long).view(-1, seq_len) for k in range(3)]
    stats = {"examples": len(rows) - dropped, "truncated": truncated, "dropped": dropped,
             "tokens": total, "scored_tokens": int(scored_tokens(tensors[1]))}
    return PackedDataset(*tensors, stats)


def record_order(n: int, seed: int) -> list[int]:
    """The order build_datasets puts n records in (data.seed): the first are held out for validation, the rest are
    packed into rows in this order."""
    return torch.randperm(n, generator=_generator("split", seed)).tolist()


def build_datasets(cfg: RunConfig, tokenizer, report: bool = True) -> tuple[PackedDataset, PackedDataset]:
    """(train, val) packed rows of `data.seq_len` tokens; `report`: print what the training split holds.

    Records are shuffled by data.seed; when the run evaluates (train.eval_every > 0), the first data.val_fraction of
    them (at least one when val_fraction > 0 and there are two or more) are the validation split. Each split is
    tokenized and packed on its own.
    """
    data = cfg.data
    records = load_records(data)
    n = len(next(iter(records.values())))
    order = record_order(n, data.seed)
    holds_out = data.val_fraction > 0 and cfg.train.eval_every > 0 and n >= 2
    n_val = min(max(1, round(n * data.val_fraction)), n - 1) if holds_out else 0
    if data.mode == "text":
        train, val = (_text_rows(records, rows, tokenizer, data.seq_len) for rows in (order[n_val:], order[:n_val]))
    else:
        template = Template(tokenizer, data.template)
        pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        train, val = (_instruction_rows(records, rows, template, data.seq_len, pad)
                      for rows in (order[n_val:], order[:n_val]))
        s = train.stats
        if report:
            print(f"[lorasp] data: {s['examples']} training examples in {len(train)} rows of {data.seq_len} tokens "
                  f"({template.kind} template), {s['scored_tokens']} scored tokens; {s['truncated']} truncated from "
                  f"the prompt side, {s['dropped']} dropped (answer longer than data.seq_len)", flush=True)
    if len(train) == 0:
        raise DataError(f"data.seq_len = {data.seq_len}: the training split has only {train.stats['tokens']} "
                        "tokens, not enough for one sequence")
    if cfg.train.eval_every > 0 and len(val) == 0:
        raise DataError(f"data.val_fraction = {data.val_fraction}: the validation split has {val.stats['tokens']} "
                        f"tokens, not enough for one sequence of data.seq_len={data.seq_len} "
                        "(or set train.eval_every=0)")
    return train, val


def check_batch_fits(train_ds: PackedDataset, cfg: RunConfig) -> None:
    if cfg.train.micro_batch_size > len(train_ds):
        raise DataError(f"train.micro_batch_size = {cfg.train.micro_batch_size}: larger than the training split "
                        f"({len(train_ds)} sequences of data.seq_len={cfg.data.seq_len})")


# ------------------------------------------------------------------------------------------------------ sample order


def global_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training rows in `epoch`: a permutation that depends on (n, seed, epoch) only."""
    return torch.randperm(n, generator=_generator("order", seed, epoch))


def micro_batch_indices(
    n: int, seed: int, sample_pos: int, micro_batch: int, rank: int, world_size: int, grad_accum: int
) -> list[list[int]]:
    """The row indices `rank` trains on in the optimizer step that starts at `sample_pos`.

    The run reads one endless stream of samples: epoch 0's permutation of the n rows, then epoch 1's, and so on
    (`global_order`, seeded by data.seed). The stream never depends on the world size. One step consumes the next
    `micro_batch * grad_accum * world_size` samples from `sample_pos` (the data position a checkpoint saves; the
    next step starts that many samples later). Rank r takes every world_size-th of them starting at the r-th, and
    splits its share into grad_accum micro-batches of micro_batch indices. So a step trains on the same samples with
    1 rank x micro-batch 4 as with 2 x 2 or 4 x 1, and a run resumed on another world size continues the same stream.
    """
    step = micro_batch * grad_accum * world_size
    positions = range(sample_pos + rank, sample_pos + step, world_size)
    orders = {e: global_order(n, seed, e) for e in range(sample_pos // n, (sample_pos + step - 1) // n + 1)}
    mine = [int(orders[p // n][p % n]) for p in positions]
    return [mine[k * micro_batch : (k + 1) * micro_batch] for k in range(grad_accum)]
