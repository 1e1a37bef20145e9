"""Loading a Hugging Face causal LM and finding the matrices we adapt and quantize.

Discovery is structural, not by hard-coded names: the decoder blocks are the
``nn.ModuleList`` whose length is the config's layer count, the layer index is the
position in that list, and every ``nn.Linear`` inside a block is adaptable. The table
below only gives well-known projections a canonical module type so that the
configuration model sees "q" for Llama's ``q_proj`` and Falcon's ``query`` alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from coalora_edge import resources
from coalora_edge.errors import ModelError
from coalora_edge.schemes.base import Shape

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


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is; a hub id ("org/name") downloaded to the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{name_or_path} is a file; pass the model folder that holds config.json")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name_or_path} not found; pass a folder with config.json or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth and not-found errors all end the same way for the user
        raise ModelError(
            f"could not fetch {name_or_path} from the Hugging Face hub ({type(e).__name__}); "
            "check the id and the network, or pass a local folder"
        ) from None


def load_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"{model_dir}/config.json is not a model config transformers knows: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(
            f"{model_dir} holds a {config.model_type!r} model, which is not a causal language model; "
            "pass a decoder LM such as Llama, Mistral, Qwen, Phi or Gemma"
        )
    return config


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM for fine-tuning: eval mode, weights materialised, on ``device``."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(name_or_path)
    config = load_config(model_dir, trust_remote_code)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ModelError(f"{model_dir} has a config but no weights (*.safetensors); download the full model")
    resources.check(resources.load_need(str(model_dir), resources.weight_count(model_dir), dtype.itemsize))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ModelError(f"could not load weights from {model_dir}: {str(e).splitlines()[0]}") from None
    _restore_tied_weights(model, model_dir)
    return model.to(device).eval()


def load_tokenizer(model_dir: Path, vocab_size: int, trust_remote_code: bool = False):
    """The tokenizer beside the weights, refused if it yields ids past the model's embedding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, unknown classes and parse errors alike: no usable tokenizer
        raise ModelError(f"{model_dir} has no usable tokenizer ({type(e).__name__}); pass a model folder with "
                         "its tokenizer files (tokenizer.json or the files its tokenizer class needs)") from None
    if len(tokenizer) > vocab_size:
        raise ModelError(f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model embeds only "
                         f"{vocab_size}; pass the tokenizer the model was trained with")
    return tokenizer


def _restore_tied_weights(model: nn.Module, model_dir: Path) -> None:
    """Load parameters that transformers left on the meta device.

    A checkpoint saved with shared tensors keeps one name per tied group and records the
    dropped names as aliases in the safetensors metadata (``{"model.embed_tokens.weight":
    "lm_head.weight"}`` in TinyStories-656K). transformers 4.57 treats ``lm_head.weight``
    as the tied copy, skips it, and ties it to an embedding it never loaded: both stay
    on ``meta`` and the first forward fails with "unsupported scalarType" in the rotary
    embedding (autocast is asked about device "meta"). We load the stored tensor into
    the canonical parameter and tie again.
    """
    missing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    if not missing:
        return
    from safetensors import safe_open

    restored: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            aliases = f.metadata() or {}
            for name in missing - restored.keys():
                source = name if name in keys else aliases.get(name)
                if source in keys:
                    restored[name] = f.get_tensor(source)
    for name, tensor in restored.items():
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        old = getattr(module, leaf)
        setattr(module, leaf, nn.Parameter(tensor.to(old.dtype), requires_grad=old.requires_grad))
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ModelError(f"{model_dir} lacks weights for {', '.join(still[:3])}; the checkpoint is incomplete")
