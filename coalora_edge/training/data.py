"""Training text: files or a Hugging Face dataset -> token blocks, with a held-out split.

Sources: plain text files (``.txt``, ``.md``, anything UTF-8), JSON Lines with a
``text`` field (``.jsonl``), and ``hf:NAME[:SPLIT]`` for a Hugging Face dataset (a hub
id where the network allows, or a local dataset folder: the same loading code).

Each source is tokenized as one stream (BOS first when the tokenizer adds one, EOS
between JSONL records) and cut into blocks of ``seq_len`` tokens. The validation split
is the *tail* of every source, never interleaved with training blocks, so no
validation text leaks into training through overlapping context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from coalora_edge.errors import DataError

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class TokenBlocks:
    train: torch.Tensor  # (n_train, seq_len) int64
    valid: torch.Tensor  # (n_valid, seq_len) int64

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def _read_utf8(path: Path) -> str:
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file; pass each text (.txt) or JSON Lines (.jsonl) file")
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass text (.txt) or JSON Lines (.jsonl) files")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"data file {path} looks binary (NUL bytes); pass UTF-8 text or JSON Lines")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 (byte {e.start}); convert it, e.g. with iconv -t UTF-8") from None


def _jsonl_records(path: Path) -> list[str]:
    records = []
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{n}: expected an object with a string field \"text\"")
        records.append(obj["text"])
    return records


def _hf_records(spec: str) -> list[str]:
    name, _, split = spec[len(HF_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec} needs the `datasets` package; pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # hub, network and format errors all mean: this source is unusable
        raise DataError(f"could not load dataset {name!r} split {split or 'train'!r}: {str(e).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no \"text\" column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if isinstance(t, str)]


def read_source(spec: str) -> list[str]:
    """The documents of one source: a whole text file is one document."""
    if spec.startswith(HF_PREFIX):
        docs = _hf_records(spec)
    else:
        path = Path(spec).expanduser()
        docs = _jsonl_records(path) if path.suffix == ".jsonl" else [_read_utf8(path)]
    if not any(d.strip() for d in docs):
        raise DataError(f"data source {spec} holds no text")
    return docs


def tokenize_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """Documents -> one token stream: BOS (if the tokenizer uses one) per document, EOS after it."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
        if eos is not None and len(docs) > 1:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def load_blocks(tokenizer, sources: Sequence[str], seq_len: int, valid_fraction: float = 0.1) -> TokenBlocks:
    """Token blocks of ``seq_len`` from every source; each source's last blocks validate."""
    if seq_len < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {seq_len}")
    if not 0 < valid_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {valid_fraction}")
    train, valid = [], []
    for spec in sources:
        stream = tokenize_stream(tokenizer, read_source(spec))
        blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)  # (n, seq_len)
        n_valid = max(1, round(len(blocks) * valid_fraction))
        if len(blocks) < n_valid + 1:
            raise DataError(
                f"{spec} gives {len(stream)} tokens, too few for one training and one validation block "
                f"of {seq_len}; add text or lower --seq-len"
            )
        train.append(blocks[:-n_valid])
        valid.append(blocks[-n_valid:])
    return TokenBlocks(torch.cat(train), torch.cat(valid))
