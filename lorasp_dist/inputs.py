"""A run's inputs, checked before anything starts: the paths exist, the data has the configured columns, the tokenizer
fits the model's vocabulary, data.seq_len fits the model's context.

Cheap on purpose: it reads headers, a first record and config files, builds nothing and writes nothing, and imports
nothing heavier than json (pyarrow for parquet, sentencepiece for a bare tokenizer.model). So `lorasp validate`,
`lorasp launch --dry-run` and `lorasp launch` (before Ray starts) end on bad input with one line in about a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lorasp_dist.config import ConfigError, DataConfig, RunConfig
from lorasp_dist.ds_config import build_ds_config
from lorasp_dist.presets import PRESETS

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class DataError(ConfigError):
    """Bad data input: one line, `field = value: what is wrong / accepted`. The CLI exits with code 2."""


# --- data --------------------------------------------------------------------------------------------------------

def builtin_corpus_dir() -> Path:
    """The English YAML files of chatterbot-corpus, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.path = None: the built-in corpus needs chatterbot-corpus (pip install chatterbot-corpus)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def data_files(data: DataConfig) -> tuple[list[Path], str]:
    """The files behind `data` (sorted) and their format."""
    if data.path is None:
        return sorted(builtin_corpus_dir().glob("*.yml")), "chatterbot"
    path, shown = data.path, repr(str(data.path))
    if not path.exists():
        raise DataError(f"data.path = {shown}: not found")
    if path.is_dir():
        fmt = "text" if data.format == "auto" else data.format  # a directory of .txt files is a text corpus
        files = sorted(p for p in path.iterdir() if p.is_file() and EXTENSIONS.get(p.suffix.lower()) == fmt)
        if not files:
            exts = [e for e, f in EXTENSIONS.items() if f == fmt]
            raise DataError(f"data.path = {shown}: a directory without {'/'.join(exts)} files")
        return files, fmt
    fmt = EXTENSIONS.get(path.suffix.lower()) if data.format == "auto" else data.format
    if fmt is None:
        raise DataError(f"data.path = {shown}: unsupported extension {path.suffix!r}; "
                        f"accepted: {', '.join(EXTENSIONS)} "
                        "(or set data.format)")
    return [path], fmt


def _first_columns(path: Path, fmt: str) -> list[str] | None:
    """The column names of the first record of a file; None for an empty one."""
    if fmt == "text":
        return ["text"]
    if fmt == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_schema(path).names
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
        if first is None:
            return None
        if fmt == "json" and first.lstrip().startswith("["):  # one JSON array of records, not JSON lines
            f.seek(0)
            records = json.load(f)
            return sorted(records[0]) if records and isinstance(records[0], dict) else None
    record = json.loads(first)
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON {type(record).__name__}, not an object")
    return sorted(record)


def check_data(data: DataConfig) -> None:
    """The data exists in a readable format and its first record has the columns data.mode needs."""
    files, fmt = data_files(data)
    if data.path is None:
        return
    fields = ("text_column",) if data.mode == "text" else ("prompt_column", "response_column")
    for path in files:
        try:
            columns = _first_columns(path, fmt)
        except Exception as e:  # malformed input surfaces as many exception types
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"data.path = {str(data.path)!r}: cannot be read as {fmt}: {reason}") from None
        if columns is None:
            continue  # an empty file; the data must not be empty as a whole
        for field in fields:
            column = getattr(data, field)
            if column not in columns:
                raise DataError(f"data.{field} = {column!r}: not a column of {data.path}; "
                                f"columns: {', '.join(columns)}")
        return
    raise DataError(f"data.path = {str(data.path)!r}: the dataset is empty")


# --- model and tokenizer -----------------------------------------------------------------------------------------

def model_limits(cfg: RunConfig) -> tuple[int | None, int | None, int | None, str]:
    """(vocabulary size, context length, decoder layers, where they come from) of the base, from its config.json or
    the preset."""
    if cfg.model.path is None:
        preset = PRESETS[cfg.model.preset]
        vocab = cfg.data.vocab_size if cfg.model.preset == "tiny" else preset.vocab_size  # model.load builds it so
        return vocab, preset.max_position_embeddings, preset.num_hidden_layers, f"preset {cfg.model.preset}"
    path, shown = Path(cfg.model.path), repr(str(cfg.model.path))
    if not path.is_dir():
        raise ConfigError(f"model.path = {shown}: not found (a local checkpoint directory)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path = {shown}: not a checkpoint directory (no config.json)")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ConfigError(f"model.path = {shown}: no model.safetensors or model.safetensors.index.json in it")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path = {shown}: unreadable config.json ({e})") from None
    config = config.get("text_config", config)  # a multimodal checkpoint: its language model's
    return (config.get("vocab_size"), config.get("max_position_embeddings"), config.get("num_hidden_layers"),
            f"{path / 'config.json'}")


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_size(path: Path) -> int | None:
    """How many token ids a tokenizer directory uses (its largest id + 1), read from its files; None if they do not
    say (then the engine checks it once the tokenizer is loaded)."""
    if (path / "tokenizer.json").is_file():
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = spec.get("model", {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in spec.get("added_tokens") or []]
        return max(ids) + 1 if ids else None
    if (path / "tokenizer.model").is_file():
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size()
    return None


def check_tokenizer(cfg: RunConfig, vocab: int | None, where: str) -> None:
    """data.tokenizer, else the checkpoint's own, else the one training will make of data.vocab_size tokens: it
    must not use ids beyond the model's vocabulary."""
    field, path = "data.tokenizer", cfg.data.tokenizer
    if path is None and cfg.model.path is not None and has_tokenizer(Path(cfg.model.path)):
        field, path = "model.path", Path(cfg.model.path)
    if path is not None:
        shown = repr(str(path))
        if not Path(path).is_dir():
            raise DataError(f"{field} = {shown}: not found (a directory with tokenizer files)")
        if not has_tokenizer(Path(path)):
            raise DataError(f"{field} = {shown}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        try:
            size = tokenizer_size(Path(path))
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{field} = {shown}: cannot read the tokenizer ({e})") from None
        if vocab is not None and size is not None and size > vocab:
            raise DataError(f"{field} = {shown}: its {size} tokens do not fit the model's vocabulary of {vocab} "
                            f"({where}); use a tokenizer of at most {vocab} tokens")
        return
    if vocab is not None and cfg.data.vocab_size > vocab:
        raise DataError(f"data.vocab_size = {cfg.data.vocab_size}: more than the model's vocabulary of {vocab} "
                        f"({where}); use at most {vocab}")


# --- the method --------------------------------------------------------------------------------------------------

def check_resample(cfg: RunConfig) -> None:
    """Mask redraws move the optimizer's partitions in memory, or on the host (offload_optimizer.device = cpu); an
    optimizer swapped to NVMe is not covered (lorasp_dist/lorasp/zero3.py)."""
    offload = build_ds_config(cfg, 1)["zero_optimization"].get("offload_optimizer") or {}
    if offload.get("device") == "nvme":
        raise ConfigError(
            f"lorasp.resample_every = {cfg.lorasp.resample_every}: mask redraws are not supported with the optimizer "
            "offloaded to NVMe; use 0, or deepspeed.overrides.zero_optimization.offload_optimizer.device=cpu"
        )


# --- all of them -------------------------------------------------------------------------------------------------

def check_inputs(cfg: RunConfig) -> None:
    """Every check of a run's inputs that needs no built model, tokenizer or dataset (see the module's docstring)."""
    if cfg.lorasp.resample_every:
        check_resample(cfg)
    vocab, context, layers, where = model_limits(cfg)
    if context is not None and cfg.data.seq_len > context:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len}: longer than the model's context, "
                          f"max_position_embeddings = {context} ({where}); use at most {context}")
    checkpointed = cfg.train.checkpoint_layers
    if layers is not None and checkpointed is not None and checkpointed > layers:
        raise ConfigError(f"train.checkpoint_layers = {checkpointed}: more than the model's {layers} decoder layers "
                          f"({where}); use 0 to {layers}")
    resident = cfg.deepspeed.resident_layers
    if layers is not None and resident > layers:
        raise ConfigError(f"deepspeed.resident_layers = {resident}: more than the model's {layers} decoder layers "
                          f"({where}); use 0 to {layers}")
    check_data(cfg.data)
    check_tokenizer(cfg, vocab, where)
