"""How llama.cpp sees a Hugging Face model: architecture, hyper-parameters, tensor names
and the row order of the rotary projections.

Only decoder families whose tensors llama.cpp computes the way transformers does are
listed; everything else is refused with the list of what is supported. Llama and
Mistral run under llama.cpp's ``llama`` architecture, whose rotary embedding rotates
adjacent pairs (x0, x1), (x2, x3), ... while transformers rotates the two halves of each
head: their q/k rows are reordered to match. Qwen2/Qwen3 use llama.cpp's NeoX rotation,
which is transformers' own, so their rows stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from coalora_edge.errors import ModelError


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    interleaved_rope: bool  # llama.cpp rotates adjacent pairs: reorder q/k rows


#: Hugging Face ``model_type`` -> llama.cpp architecture
ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, interleaved_rope=False),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3, interleaved_rope=False),
}

#: GGUF tensor (within a block) whose rows are grouped by head -> config key of its head count
ROTARY_TENSORS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}

#: transformers ``rope_scaling["rope_type"]`` -> llama.cpp's scaling; absent = no scaling
ROPE_SCALING = {"linear": gguf.RopeScalingType.LINEAR}
UNSCALED_ROPE = (None, "default")


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """Row ``i`` of the llama.cpp tensor is row ``order[i]`` of the Hugging Face one.

    Within each head, transformers keeps the first halves of the rotated pairs in the
    first half of the rows; llama.cpp wants each pair's halves adjacent.
    """
    if rows % (2 * heads):
        raise ModelError(f"{rows} rows cannot be split into {heads} heads of rotary pairs; the model config is inconsistent")
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


@dataclass(frozen=True)
class Target:
    """One Hugging Face model as a llama.cpp model of architecture ``arch``."""

    arch: Arch
    config: Any  # transformers PretrainedConfig
    names: gguf.TensorNameMap

    @classmethod
    def from_config(cls, config: Any) -> Target:
        arch = ARCHS.get(config.model_type)
        if arch is None:
            raise ModelError(
                f"llama.cpp export supports {', '.join(sorted(ARCHS))} models, not {config.model_type!r}; "
                "export this model to ONNX (--format onnx) instead"
            )
        scaling = (getattr(config, "rope_scaling", None) or {}).get("rope_type")
        if scaling not in UNSCALED_ROPE and scaling not in ROPE_SCALING:
            raise ModelError(
                f"the model uses {scaling!r} RoPE scaling, which this exporter does not write "
                f"(supported: none, {', '.join(ROPE_SCALING)}); export it to ONNX (--format onnx) instead"
            )
        return cls(arch, config, gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers))

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch.gguf_arch]

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def tensor_name(self, hf_name: str) -> str:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``."""
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"llama.cpp's {self.name} architecture has no tensor for {hf_name}; this model variant is not supported")
        return name

    def row_order(self, tensor_name: str, rows: int) -> np.ndarray | None:
        """How to reorder the rows (output features) of a GGUF tensor; None: keep them."""
        kind = tensor_name.split(".")[-2] if tensor_name.startswith("blk.") else None
        if not self.arch.interleaved_rope or kind not in ROTARY_TENSORS:
            return None
        config = self.config
        heads = getattr(config, ROTARY_TENSORS[kind], None) or config.num_attention_heads
        return rope_row_order(rows, heads)

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        c = self.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_rope_freq_base(getattr(c, "rope_theta", 10000.0))
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_vocab_size(c.vocab_size)
        scaling = getattr(c, "rope_scaling", None) or {}
        if scaling.get("rope_type") in ROPE_SCALING:
            writer.add_rope_scaling_type(ROPE_SCALING[scaling["rope_type"]])
            writer.add_rope_scaling_factor(scaling["factor"])
