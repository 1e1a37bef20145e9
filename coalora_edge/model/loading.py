"""Loading a Hugging Face causal LM, its config and its tokenizer from a folder or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from coalora_edge import resources
from coalora_edge.errors import ModelError


#: config fields that size a decoder's tensors, where a model has them
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


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

    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    try:
        fields = json.loads(path.read_bytes())
    except ValueError:
        fields = None  # transformers names the problem below
    if fields is not None and not isinstance(fields, dict):
        raise ModelError(f"{path} holds a JSON {type(fields).__name__}, not a model config object; restore the "
                         "model's config.json")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"{path} is not a model config transformers knows: {str(e).splitlines()[0]}") from None
    except (TypeError, AttributeError) as e:  # a field of the wrong type, e.g. "hidden_size": "big"
        raise ModelError(f"{path} has a field of the wrong type ({str(e).splitlines()[0]}); restore the "
                         "model's config.json") from None
    for name in SIZE_FIELDS:  # before any tensor is built from them
        value = getattr(config, name, None)
        if value is not None and (type(value) is not int or value < 1):
            raise ModelError(f"{path} has {name} = {value!r}, which must be a positive integer; restore the "
                             "model's config.json")
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
