"""The run config: one pydantic model, the single source of defaults and validation.

Loaded from YAML, then dotted CLI overrides (`lorasp.ratio=0.25 train.max_steps=10`) are applied, then the whole
thing is validated. Every error is a `ConfigError` whose message names the field, the bad value and what is accepted.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from lorasp_dist.presets import PRESETS
from lorasp_dist.sizes import GiB, format_size, parse_size

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DS_CONFIGS = ("zero3", "zero3_offload_optimizer", "zero3_offload_all")
# An `env` key looks secret when one of its words (split at anything but letters and digits, any case) ends in one
# of these, or in one of these plus S: HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, GITHUB_PAT is not.
SECRET_WORD_ENDINGS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "AUTH")
REDACTED = "<redacted>"
MAX_LR = 3.4e37  # AdamW's first step is lr / (1 - beta1) = 10 x lr, and must fit in a float32 (3.4e38)
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one path component: never '..', '/', or a hidden name


class ConfigError(ValueError):
    """A bad setting. The message is one line per problem: `field = value: what is accepted`."""


# A memory size: written "80GiB" in YAML and on the command line, bytes once validated, written back as "80GiB".
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRASPConfig(_Section):
    """The method. `variant`: lorasp (a `ratio` of A and of B trains), lora (all of A and B), lora-fa (A frozen)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    ratio: float = Field(0.5, gt=0, le=1)
    strategy: Literal["random", "rows", "cols"] = "random"
    seed: int = 0
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    resample_every: int = Field(0, ge=0)
    variant: Literal["lorasp", "lora", "lora-fa", "full"] = "lorasp"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def trainable_count(numel: int, ratio: float) -> int:
    """How many of a matrix's `numel` entries train at `lorasp.ratio` (here, not beside the masks: the memory plan
    counts them without loading torch). Python's round() rounds half to even; the method wants the plain nearest
    integer, so n=3, ratio=.5 -> 2."""
    return min(numel, int(math.floor(ratio * numel + 0.5)))


class ModelConfig(_Section):
    preset: str | None = "tiny"  # synthetic base with exact LLaMA shapes, built directly in 4-bit
    path: Path | None = None  # a local HF checkpoint (bf16/fp32 safetensors or pre-quantized 4-bit); replaces preset
    quantize: bool = True  # NF4 + double quant, bf16 compute, bf16 quant storage
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _path_wins(cls, data):
        # A checkpoint path replaces the preset, so no run name, plan or report calls the checkpoint "tiny".
        if isinstance(data, dict) and data.get("path") is not None:
            data = {**data, "preset": None}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v):
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset; accepted: {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.preset is None:
            raise ValueError("set model.preset or model.path")
        return self


class DataConfig(_Section):
    path: Path | None = None  # None: the built-in corpus (chatterbot-corpus, English, read from the installed package)
    format: Literal["auto", "jsonl", "json", "parquet", "text"] = "auto"
    mode: Literal["text", "instruction"] = "text"
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # instruction mode: auto = the tokenizer's chat template when it has one, else plain (PROMPT_TEMPLATE in data.py)
    template: Literal["auto", "chat", "plain"] = "auto"
    tokenizer: Path | None = None  # None: the checkpoint's own, else a sentencepiece model trained on the data
    vocab_size: int = Field(1024, gt=0)  # for a sentencepiece tokenizer trained by us
    seq_len: int = Field(256, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held out only when train.eval_every > 0
    seed: int = 0


class TrainConfig(_Section):
    max_steps: int = Field(20, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    gradient_checkpointing: bool = True
    # On GPUs: the decoder layers' RMSNorm and SwiGLU as compiled fused kernels (model/fused.py), not transformers'
    # chains of elementwise kernels; CPU runs keep transformers' modules. llama-65b on one H200 at micro-batch 4:
    # +8% tokens/s and 18 GiB less reserved; at micro-batch 1 no change (bench/NOTES.md, session 18).
    fused_kernels: bool = True
    # With checkpointing: how many decoder layers, the first ones, recompute their activations in the backward (None:
    # all). The others keep theirs, which skips a third of their arithmetic for their activations' memory;
    # `lorasp plan --gpu-mem` finds the smallest number that fits. Like torchtune's selective activation checkpointing.
    checkpoint_layers: int | None = Field(None, ge=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    log_every: int = Field(1, gt=0)
    profile_steps: list[int] = Field(default_factory=list)  # [K]: torch.profiler tables of steps K, K+1 (profile/)
    eval_every: int = Field(0, ge=0)  # 0: no evaluation
    eval_batches: int = Field(4, gt=0)
    save_every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, gt=0)
    resume: str = "auto"  # auto | never | a checkpoint directory
    max_nonfinite_steps: int = Field(3, gt=0)  # consecutive steps with a NaN/inf loss or grad norm before the run stops
    # auto, and every checkpoint of the run is corrupt: stop (exit 2), or with true move them to checkpoints/corrupt/
    # and start over from step 0
    restart_if_corrupt: bool = False
    output_dir: Path = Path("runs")
    run_name: str | None = None  # None: a unique name from the time; else one directory name inside output_dir

    @field_validator("run_name")
    @classmethod
    def _one_directory_name(cls, v):
        if v is not None and not RUN_NAME.fullmatch(v):
            raise ValueError("must be one directory name: letters, digits, '.', '_' and '-', not starting with '.'")
        return v

    @model_validator(mode="after")
    def _checkpoint_layers_need_checkpointing(self):
        if self.checkpoint_layers is not None and not self.gradient_checkpointing:
            raise ValueError(f"train.checkpoint_layers = {self.checkpoint_layers}: needs "
                             "train.gradient_checkpointing=true (without it no layer is checkpointed)")
        return self

    @field_validator("lr")
    @classmethod
    def _lr_fits(cls, v):
        if v > MAX_LR:
            raise ValueError(f"must be at most {MAX_LR:g}: AdamW's first step, 10 x lr, must fit in a float32")
        return v


class DeepSpeedConfig(_Section):
    config: Literal["zero3", "zero3_offload_optimizer", "zero3_offload_all"] = "zero3"
    # layer: ZeRO-3 gathers a decoder layer whole, in one coalesced all-gather, and hooks nothing inside it (a few
    # hundred gathers a step instead of thousands, each of which made the other rank wait on this one's host);
    # module: every module on its own (DeepSpeed's default), a smaller live set. Only checkpointed layers are fetched
    # whole (see engine/train.py), and each of them rebuilds its adapters in one pass (lorasp/layer.py, AdapterGroup).
    fetch: Literal["layer", "module"] = "layer"
    # How many of ZeRO-3's fetches may be in flight before the host waits for the oldest (DeepSpeed fixes 2). Each
    # all-gather ends only once the other ranks' hosts have issued theirs, so at 2 every rank's host waits for the
    # slowest one layer after layer; more lets each host queue its compute ahead (a released gather stays reserved
    # until the GPU has read it).
    fetches_in_flight: int = Field(2, ge=1)
    # The first N decoder layers keep their frozen 4-bit weights whole on every rank, outside ZeRO-3: never gathered
    # (three gathers a layer a step, forward, recompute and backward, otherwise), at the cost of holding them whole.
    # `lorasp plan --gpu-mem` prints the most that fit; with one rank all of them cost nothing.
    resident_layers: int = Field(0, ge=0)
    overrides: dict[str, Any] = Field(default_factory=dict)  # merged into the JSON template, e.g. zero_optimization.*


class LauncherConfig(_Section):
    num_workers: int = Field(2, gt=0)
    gpus_per_worker: float = Field(0, ge=0, allow_inf_nan=False)  # 0: CPU workers
    cpus_per_worker: float = Field(1, gt=0, allow_inf_nan=False)
    address: str | None = None  # None: start a local Ray instance; "auto" or HOST:PORT: join a cluster
    storage_path: Path | None = None  # None: train.output_dir; must be shared by all nodes of a multi-node run
    max_failures: int = Field(2, ge=0)
    dashboard_host: str = "127.0.0.1"
    object_store_memory: int | None = Field(None, gt=0)  # bytes; None: 256 MiB on a local instance
    memory_monitor: bool = False  # Ray's OOM killer would kill CPU-offload ranks that legitimately hold host RAM

    @property
    def torch_backend(self) -> str:
        # NCCL puts one rank on a GPU; ranks sharing one (gpus_per_worker < 1) talk over gloo, as CPU ranks do.
        return "nccl" if self.gpus_per_worker >= 1 else "gloo"


class MemoryConfig(_Section):
    enabled: bool = True
    sample_interval_s: float = Field(0.5, gt=0)
    gpu_mem: Size | None = Field(None, gt=0)  # for `plan` and `launch`: memory per GPU, e.g. 80GiB
    host_mem: Size | None = Field(None, gt=0)  # host memory per node, e.g. 512GiB
    # A plan fits when it leaves max(headroom_fraction × capacity, headroom_min) free, on the GPU and on the host:
    # what the allocator, NCCL and the other processes of a node take beyond the plan's terms.
    headroom_fraction: float = Field(0.05, ge=0, lt=1)
    headroom_min: Size = Field(GiB, ge=0)
    record_history_steps: list[int] = Field(default_factory=list)  # [K] records a CUDA snapshot for steps K..K+2
    # PyTorch's expandable segments: blocks grow in place instead of splitting fixed segments, so what the allocator
    # reserves stays close to what it allocates (the gap was 4.1 GiB of 27.5 at llama-65b, 2 GPUs, micro-batch 1).
    expandable_segments: bool = True


# NVLink multicast stays off by default: on shared hosts it can wedge GPUs.
DEFAULT_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "HF_HUB_OFFLINE": "1",
}


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lorasp: LoRASPConfig = Field(default_factory=LoRASPConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    # Passed to every rank's environment, on top of DEFAULT_ENV: a config's own `env` adds keys or changes them,
    # so setting one variable never drops NVLink multicast's off switch.
    env: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ENV))

    @field_validator("env", mode="before")
    @classmethod
    def _env_over_defaults(cls, v):
        return {**DEFAULT_ENV, **v} if isinstance(v, dict) else v

    @field_validator("env")
    @classmethod
    def _env_names_and_values(cls, v):
        # Checked here, not in every rank's os.environ, where a bad one fails each rank (and Ray restarts them).
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"key {key!r}: expected an environment variable name (letters, digits and _, not "
                                 "starting with a digit)")
            if "\0" in value:  # the value itself is not shown: it may be a secret
                raise ValueError(f"key {key!r}: its value holds a NUL character, which no environment can carry")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.preset == "tiny" and self.data.tokenizer is None and self.model.path is None:
            if self.data.vocab_size > PRESETS["tiny"].vocab_size:
                raise ValueError(f"data.vocab_size={self.data.vocab_size} exceeds the tiny preset's vocabulary (1024)")
        return self

    def rank_env(self) -> dict[str, str]:
        """Every rank's environment additions: the `env` section, plus the CUDA allocator's settings
        (memory.expandable_segments) unless `env` or the launching shell sets PYTORCH_CUDA_ALLOC_CONF."""
        env = dict(self.env)
        if self.memory.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in {**os.environ, **env}:
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        return env

    def secret_env(self) -> dict[str, str]:
        """The `env` entries whose keys look secret (is_secret)."""
        return {k: v for k, v in self.env.items() if is_secret(k)}

    def redacted(self) -> dict:
        """The config as JSON data with every secret `env` value replaced by REDACTED: what may be written or shown."""
        data = self.model_dump(mode="json")
        data["env"] = {k: REDACTED if is_secret(k) else v for k, v in data["env"].items()}
        return data

    def to_yaml(self) -> str:
        """For files and consoles, so secrets are redacted; the ranks get the real values another way."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)


def secret_override(item: str) -> str | None:
    """The `env` key of a `env.KEY=VALUE` override whose key looks secret (is_secret), else None."""
    key = item.partition("=")[0]
    return key[4:] if key.startswith("env.") and is_secret(key[4:]) else None


def redact_override(item: str) -> str:
    """An override as it may be printed or logged: a secret `env` value replaced by REDACTED."""
    return f"env.{key}={REDACTED}" if (key := secret_override(item)) else item


def is_secret(key: str) -> bool:
    """An `env` key that looks like it names a secret (SECRET_WORD_ENDINGS); TOKENIZERS_PARALLELISM does not."""
    words = re.split(r"[^A-Z0-9]+", key.upper())
    return any(w.endswith(end) or w.endswith(end + "S") for w in words for end in SECRET_WORD_ENDINGS)


def _describe(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "config"
    value = err.get("input")
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{field}: unknown key (check the spelling; `lorasp print-config` lists every key)"
    if kind == "missing":
        return f"{field}: required but missing"
    msg = msg.removeprefix("Value error, ")
    if kind == "literal_error":
        msg = msg.replace("Input should be", "accepted:")
    else:
        msg = msg.replace("Input should be", "must be")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if err["loc"] and err["loc"][0] == "env" and is_secret(str(err["loc"][-1])):
        shown = REDACTED
    return f"{field} = {shown}: {msg}"


def _raise(e: ValidationError, prefix: str = ""):
    raise ConfigError("\n".join(prefix + _describe(err) for err in e.errors())) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value parsed as YAML (so 10, 0.5, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. lorasp.ratio=0.25")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key part; expected e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping of sections, got {kind}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + dotted overrides -> a validated RunConfig, or a ConfigError."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return validate(data)


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        _raise(e)


def make_lorasp_config(**kwargs) -> LoRASPConfig:
    """LoRASPConfig(**kwargs) with errors as ConfigError (field `lorasp.<name>`)."""
    try:
        return LoRASPConfig(**kwargs)
    except ValidationError as e:
        _raise(e, "lorasp.")
