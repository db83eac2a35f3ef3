"""LLaMA shapes by name. Synthetic bases, the memory model and the benchmarks all read them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def hf_config(self, **overrides):
        """A transformers LlamaConfig with these shapes."""
        from transformers import LlamaConfig

        return LlamaConfig(**{**asdict(self), "tie_word_embeddings": False, **overrides})

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each of the seven projections of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_key_value_heads * (h // self.num_attention_heads)
        return {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    def num_params(self) -> int:
        """All parameters: projections, norms, embeddings and an untied lm_head."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


PRESETS: dict[str, Preset] = {
    # Tests and the demo: 4 layers, vocab 1k (a 32k vocab makes a CPU step ~2.5 s). Sizes are multiples of 64,
    # as bitsandbytes' 4-bit blocks want.
    "tiny": Preset(128, 256, 4, 4, 4, vocab_size=1024, max_position_embeddings=512),
    "llama-7b": Preset(4096, 11008, 32, 32, 32),
    "llama-13b": Preset(5120, 13824, 40, 40, 40),
    "llama-33b": Preset(6656, 17920, 60, 52, 52),
    "llama-65b": Preset(8192, 22016, 80, 64, 64),
    "llama2-70b": Preset(8192, 28672, 80, 64, 8, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
