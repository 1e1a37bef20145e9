"""What the benchmarks run on: the project's real model and text in ../shared/assets
(or ``COALORA_SHARED``), and tiny models built with TinyStories-656K's tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from coalora_edge.model.synthetic import build_tiny_model

SHARED = Path(os.environ.get("COALORA_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets"
TINYSTORIES = SHARED / "models" / "TinyStories-656K"
TINYSTORIES_TEXT = SHARED / "text" / "tinystories_dev.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_model_with_tokenizer(path: Path, **sizes) -> Path:
    """A random Llama of ``sizes`` at ``path``, with TinyStories-656K's tokenizer (vocabulary 2048)."""
    build_tiny_model(path, "llama", **{"vocab": 2048, **sizes})
    for name in TOKENIZER_FILES:
        shutil.copy(TINYSTORIES / name, path / name)
    return path
