"""The Hugging Face tokenizer files an export carries, fit for the standard snippet
``inputs = tokenizer(text, return_tensors="pt"); model.generate(**inputs)``.

A tokenizer saved as a plain ``PreTrainedTokenizerFast`` (the demo's, many converted ones)
keeps that class's default ``model_input_names``, which include ``token_type_ids``: a
decoder LM takes no such input, and both transformers' ``generate`` and optimum's
``ORTModelForCausalLM.generate`` refuse the unknown argument. The tokenizer_config.json we
write names the inputs a decoder takes; transformers reads the field back on load.
"""

from __future__ import annotations

import json
from pathlib import Path

from coalora_edge.errors import ExportError
from coalora_edge.fileio import atomic_write_json

CONFIG_FILE = "tokenizer_config.json"
#: what a causal LM's forward takes from its tokenizer
DECODER_INPUTS = ("input_ids", "attention_mask")


def keep_decoder_inputs(folder: Path) -> None:
    """Make the tokenizer saved in ``folder`` return only ``DECODER_INPUTS``."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"the tokenizer was saved without a readable {path} ({type(e).__name__}); report this bug") from None
    config["model_input_names"] = list(DECODER_INPUTS)
    atomic_write_json(path, config)
