"""The text an export is rounded and verified on: ``--calibration`` or the training data
the bundle's manifest names, cut into blocks of the training sequence length.

Verification needs hundreds of positions: over the few dozen of a handful of prompts,
one near-tie more or less moves top-1 agreement by several points (issue 15: a correct
SmolLM2 export failed at 0.833 over 66 positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import DataError
from coalora_edge.training.data import read_source, tokenize_stream

#: positions of calibration text verification adds to its fixed prompts
VERIFY_POSITIONS = 512
#: sequence length when the manifest names none
DEFAULT_SEQ_LEN = 256
#: characters read per token wanted: more than any tokenizer's longest usual token, so the
#: prefix tokenized holds the blocks asked for
CHARS_PER_TOKEN = 32


def seq_len(restored: Restored) -> int:
    """The training sequence length, the blocks' length."""
    return int(getattr(restored.bundle.manifest.training, "seq_len", 0) or DEFAULT_SEQ_LEN)


def text_blocks(restored: Restored, calibration: Path | None, count: int) -> torch.Tensor | None:
    """The first ``count`` token blocks ``(n, seq_len)`` (fewer if the text is short) of
    ``calibration`` or the training data; None when the bundle names no training data, or
    it cannot be read here. Raises DataError for a ``calibration`` file that cannot be used."""
    if calibration is not None:
        return _first_blocks(restored.tokenizer, [str(calibration)], seq_len(restored), count)
    sources = list(getattr(restored.bundle.manifest.training, "data", None) or [])
    if not sources:
        return None
    try:
        return _first_blocks(restored.tokenizer, sources, seq_len(restored), count)
    except DataError:  # moved, deleted, or a dataset this machine cannot fetch
        return None


def _first_blocks(tokenizer: Any, sources: Sequence[str], length: int, count: int) -> torch.Tensor:
    """Only the text the blocks need is tokenized: a training corpus may be gigabytes."""
    budget, docs = count * length * CHARS_PER_TOKEN, []
    for doc in (d for spec in sources for d in read_source(spec)):
        docs.append(doc[: budget])
        budget -= len(docs[-1])
        if budget <= 0:
            break
    stream = tokenize_stream(tokenizer, docs)
    n = min(count, len(stream) // length)
    if n == 0:
        raise DataError(f"{', '.join(sources)} gives {len(stream)} tokens, fewer than one block of {length}; add text")
    return stream[: n * length].view(n, length)


def verification_ids(restored: Restored, prompts: Sequence[str], calibration: Path | None,
                     limit: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of the fixed ``prompts`` (each cut to ``limit`` tokens) and of calibration
    blocks up to VERIFY_POSITIONS more positions; also how many blocks of calibration text."""
    ids = [restored.tokenizer(p)["input_ids"][:limit] for p in prompts]
    length = seq_len(restored)
    context = getattr(restored.wrapper.model.config, "max_position_embeddings", None) or length
    blocks = text_blocks(restored, calibration, -(-VERIFY_POSITIONS // min(length, context)))
    extra = [] if blocks is None else [b[:context].tolist() for b in blocks]
    return ids + extra, len(extra)
