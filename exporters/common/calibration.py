"""The text an export is rounded and verified on: ``--calibration`` or the training data
the bundle's manifest names, cut into blocks of the training sequence length.

Verification needs hundreds of positions: over the few dozen of a handful of prompts,
one near-tie more or less moves top-1 agreement by several points (issue 15: a correct
SmolLM2 export failed at 0.833 over 66 positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import DataError
from coalora_edge.training.data import load_blocks

#: positions of calibration text verification adds to its fixed prompts
VERIFY_POSITIONS = 512
#: sequence length when the manifest names none
DEFAULT_SEQ_LEN = 256


def text_blocks(restored: Restored, calibration: Path | None, count: int) -> torch.Tensor | None:
    """Up to ``count`` token blocks ``(n, seq_len)``, training blocks first; None when the
    bundle names no training data, or it cannot be read here. Raises DataError for a
    ``calibration`` file that cannot be used."""
    training = restored.bundle.manifest.training
    seq_len = int(getattr(training, "seq_len", 0) or DEFAULT_SEQ_LEN)
    if calibration is not None:
        split = load_blocks(restored.tokenizer, [str(calibration)], seq_len)
        return torch.cat([split.train, split.valid])[:count]
    sources = list(getattr(training, "data", None) or [])
    if not sources:
        return None
    try:
        split = load_blocks(restored.tokenizer, sources, seq_len)
    except DataError:  # moved, deleted, or a dataset this machine cannot fetch
        return None
    return torch.cat([split.train, split.valid])[:count]


def verification_ids(restored: Restored, prompts: Sequence[str], calibration: Path | None,
                     limit: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of the fixed ``prompts`` (each cut to ``limit`` tokens) and of calibration
    blocks up to VERIFY_POSITIONS more positions; also how many blocks of calibration text."""
    ids = [restored.tokenizer(p)["input_ids"][:limit] for p in prompts]
    seq_len = int(getattr(restored.bundle.manifest.training, "seq_len", 0) or DEFAULT_SEQ_LEN)
    context = getattr(restored.wrapper.model.config, "max_position_embeddings", None) or seq_len
    blocks = text_blocks(restored, calibration, -(-VERIFY_POSITIONS // min(seq_len, context)))
    extra = [] if blocks is None else [b[:context].tolist() for b in blocks]
    return ids + extra, len(extra)
