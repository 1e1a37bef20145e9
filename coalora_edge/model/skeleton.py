"""A model without its weights: its config (from a folder, or config.json alone from the hub)
and its parameters on PyTorch's meta device, shapes but no storage. Enough to count what a
runtime stores besides the adapted matrices without loading gigabytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from coalora_edge.errors import ModelError
from coalora_edge.model.loading import load_config


def model_config(source: str) -> Any:
    """The base model's config: from its folder, or config.json alone from the hub."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "config.json")).parent
        except Exception as e:  # not found, network and auth errors all end the same way here
            raise ModelError(
                f"base model {source} is not a folder here and its config could not be fetched from the hub "
                f"({type(e).__name__}); pass --model with the folder of the model the bundle was trained on"
            ) from None
    return load_config(path)


def meta_model(config: Any) -> nn.Module:
    """The model's parameters with shapes but no storage: what is stored, without the weights."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    # Initialising meta tensors still dispatches every init op: 0.4 s of 0.45 s for a 7B.
    # Skipping it also skips the tying of embeddings and head, which decides whether the
    # head is stored at all: tie again.
    with torch.device("meta"), no_init_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    return skeleton
