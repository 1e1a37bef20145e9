"""onnxruntime-genai's ``genai_config.json`` for an ONNX export, so that

    model = onnxruntime_genai.Model(folder)
    generator = onnxruntime_genai.Generator(model, params)

runs the folder as it is: the same model.onnx (MatMulNBits, side-car branches and all),
the tokenizer files beside it (onnxruntime-extensions reads tokenizer.json and
tokenizer_config.json), no model builder pass.

The config names optimum's graph layout (exporters/onnx/session.py): ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.%d.key/value`` in, ``logits`` and
``present.%d.key/value`` out. ``past_present_share_buffer`` is off because the graph
concatenates past and new keys into a new ``present`` tensor (genai's shared buffer is for
GroupQueryAttention graphs that write in place). Search defaults are greedy, stopping at
the tokenizer's end-of-sequence token like ``coalora-edge run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from coalora_edge.errors import ExportError
from coalora_edge.exporters.onnx.session import PAST, PRESENT
from coalora_edge.fileio import atomic_write_json
from coalora_edge.model.dims import ModelDims

CONFIG_FILE = "genai_config.json"
#: genai input role -> optimum's graph input, where the graph has it
INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}


def genai_config(model: onnx.ModelProto, filename: str, config: Any, tokenizer: Any) -> dict[str, Any]:
    """The config for ``model`` (saved as ``filename``) of the Hugging Face ``config``."""
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    dims = ModelDims.from_config(config)
    missing = sorted({"input_ids", f"{PAST}0.key", f"{PAST}0.value"} - inputs | {"logits", f"{PRESENT}0.key"} - outputs)
    if missing:
        raise ExportError(f"the exported graph lacks {', '.join(missing)}, which onnxruntime-genai needs; report this bug")
    context = config.max_position_embeddings
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden,
                "num_attention_heads": dims.heads,
                "num_hidden_layers": dims.layers,
                "num_key_value_heads": dims.kv_heads,
                "inputs": {**{role: name for role, name in INPUTS.items() if name in inputs},
                           "past_key_names": f"{PAST}%d.key", "past_value_names": f"{PAST}%d.value"},
                "outputs": {"logits": "logits", "present_key_names": f"{PRESENT}%d.key",
                            "present_value_names": f"{PRESENT}%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "past_present_share_buffer": False, "early_stopping": True, "length_penalty": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_config(folder: Path, model: onnx.ModelProto, filename: str, config: Any, tokenizer: Any) -> None:
    """Write ``folder/genai_config.json`` (see :func:`genai_config`)."""
    atomic_write_json(Path(folder) / CONFIG_FILE, genai_config(model, filename, config, tokenizer))
