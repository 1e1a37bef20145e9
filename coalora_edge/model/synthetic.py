"""Small causal LMs built from a config: for tests, benchmarks and the demo.

Real transformers architectures at toy sizes (random weights unless trained), saved as
ordinary Hugging Face folders so every code path is the one users' models take.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: per-architecture config keys beyond the common ones (facts as a table)
ARCH_EXTRAS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": None},
    "phi3": {"pad_token_id": 0},
    "gemma": {"head_dim": None},
}


def tiny_config(arch: str = "llama", *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int | None = None, vocab: int = 256, context: int = 128):
    """A transformers config of architecture ``arch`` at toy size."""
    from transformers import AutoConfig

    extras = dict(ARCH_EXTRAS[arch])
    if "head_dim" in extras:
        extras["head_dim"] = hidden // heads
    return AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **extras,
    )


def build_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **sizes) -> Path:
    """Save a randomly initialised tiny ``arch`` model (safetensors) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **sizes))
    path = Path(path)
    model.save_pretrained(path)
    return path
