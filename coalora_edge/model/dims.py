"""The dimensions of a decoder-only transformer, read from its Hugging Face config: what
its memory (KV cache, activations, compute buffers) depends on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from coalora_edge.errors import ModelError


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a decoder-only transformer that its memory depends on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelDims:
        """From a Hugging Face config: a ``PretrainedConfig`` or the dict of ``config.json``."""
        get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
        required = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
        missing = [key for key in required if not isinstance(get(key), int)]
        if missing:
            raise ModelError(
                f"model config has no integer {', '.join(missing)}; the memory model needs the "
                "Llama-style config keys (num_hidden_layers, num_attention_heads, hidden_size, ...)"
            )
        heads = get("num_attention_heads")
        return cls(
            layers=get("num_hidden_layers"),
            heads=heads,
            # Configs without these mean plain multi-head attention, hidden / heads wide
            # heads and (GPT-2, Falcon) an MLP 4 x hidden wide.
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size") or 4 * get("hidden_size"),
            vocab=get("vocab_size"),
        )
