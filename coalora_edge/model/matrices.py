"""The matrices of a Hugging Face causal LM that we adapt and quantize.

Discovery is structural, not by hard-coded names: the decoder blocks are the
``nn.ModuleList`` whose length is the config's layer count, the layer index is the
position in that list, and every ``nn.Linear`` inside a block is adaptable. The table
below only gives well-known projections a canonical module type so that the
configuration model sees "q" for Llama's ``q_proj`` and Falcon's ``query`` alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from coalora_edge.errors import ModelError

Shape = tuple[int, int]  # (out_features, in_features)

#: leaf module name -> canonical module type. Unknown leaves keep their own name.
MODULE_TYPES: dict[str, str] = {
    "q_proj": "q", "query": "q", "wq": "q",
    "k_proj": "k", "key": "k", "wk": "k",
    "v_proj": "v", "value": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o",
    "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "c_attn": "qkv",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up", "dense_h_to_4h": "up", "c_fc": "up",
    "down_proj": "down", "w2": "down", "fc2": "down", "dense_4h_to_h": "down",
    "gate_up_proj": "gate_up",
}
#: leaves whose meaning depends on whether they sit in attention or in the MLP
CONTEXT_TYPES: dict[str, tuple[str, str]] = {"dense": ("o", "down"), "c_proj": ("o", "down")}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class Matrix:
    """One adaptable weight matrix of the model."""

    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    layer: int  # index of its decoder block
    module: str  # canonical type: q, k, v, o, qkv, gate, up, down, gate_up, or the leaf name
    shape: Shape  # (out_features, in_features), as the runtime stores rows

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def module_type(path_in_block: str) -> str:
    """Canonical type of a linear layer from its path inside a decoder block."""
    parts = path_in_block.split(".")
    leaf = parts[-1]
    if leaf in CONTEXT_TYPES:
        in_attention = any(_ATTENTION.search(p) for p in parts[:-1])
        return CONTEXT_TYPES[leaf][0 if in_attention else 1]
    return MODULE_TYPES.get(leaf, leaf)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its path."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    # Blocks are the list as long as the layer count; MoE expert lists sit inside them.
    matching = [(n, m) for n, m in lists if len(m) == n_layers] or lists
    if not matching:
        raise ModelError(
            f"{type(model).__name__} has no list of decoder blocks; "
            "only transformer decoders (Llama, Mistral, Qwen, Phi, Gemma, ...) are supported"
        )
    return min(matching, key=lambda nm: nm[0].count("."))


def find_matrices(model: nn.Module) -> list[Matrix]:
    """Every nn.Linear inside the decoder blocks, in block order."""
    blocks_path, blocks = decoder_blocks(model)
    found = [
        Matrix(
            name=f"{blocks_path}.{layer}.{path}",
            layer=layer,
            module=module_type(path),
            shape=(mod.out_features, mod.in_features),
        )
        for layer, block in enumerate(blocks)
        for path, mod in block.named_modules()
        if isinstance(mod, nn.Linear)
    ]
    if not found:
        raise ModelError(
            f"no nn.Linear layers in the decoder blocks of {type(model).__name__}; "
            "models built on other layer types (e.g. GPT-2's Conv1D) are not supported"
        )
    return found
