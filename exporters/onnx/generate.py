"""`coalora-edge run` for ONNX exports: greedy generation in ONNX Runtime, after checking
the folder is the one `coalora-edge export --format onnx` wrote (every file's sha256)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from coalora_edge.errors import ExportError
from coalora_edge.exporters.common.generation import new_tokens, text_pieces
from coalora_edge.exporters.common.report import REPORT_FILE
from coalora_edge.exporters.onnx import session as ort
from coalora_edge.exporters.onnx.export import MODEL_FILE
from coalora_edge.fileio import sha256_file

#: a byte-fallback token, as SentencePiece and tokenizers' ByteFallback spell it
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def read_report(folder: Path) -> dict[str, Any]:
    """export.json of an ONNX export folder."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{folder} has no readable {REPORT_FILE} ({type(e).__name__}); pass a folder "
                              "written by `coalora-edge export --format onnx`") from None
    if not isinstance(report, dict) or report.get("format") != "onnx" or not isinstance(report.get("files"), dict):
        raise ExportError(f"{folder / REPORT_FILE} does not describe an ONNX export; export it again")
    return report


def check_files(folder: Path, report: dict[str, Any]) -> None:
    """Every file export.json lists is there with its sha256: a damaged model is refused, not run."""
    for name, recorded in report["files"].items():
        path = folder / name
        if not path.is_file() or not isinstance(recorded, dict) or sha256_file(path) != recorded.get("sha256"):
            raise ExportError(f"{path} is missing or does not match its sha256 in {REPORT_FILE}; export it again")


def context_length(folder: Path) -> int:
    """The model's context, from the config.json the export wrote beside the graph."""
    try:
        context = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        context = None
    if type(context) is not int or context < 1:
        raise ExportError(f"{folder}/config.json records no max_position_embeddings; export it again")
    return context


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Token ids -> text without control tokens (BOS, EOS, chat markers), as transformers'
    ``skip_special_tokens`` would, but keeping byte pieces: byte-fallback tokenizers that
    register ``<0xNN>`` as special tokens (the demo's) would lose every character spelled in
    bytes ("café" decoded as "caf")."""
    hidden = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special and not BYTE_PIECE.fullmatch(token.content)
    }
    return lambda ids: tokenizer.decode([i for i in ids if i not in hidden])


def stream(path: Path, prompt: str, max_tokens: int = 64, threads: int | None = None) -> Iterator[str]:
    """Greedy continuation of ``prompt`` by the export at ``path`` (its folder or model.onnx),
    piece by piece as it is generated; the folder and the prompt are checked before."""
    from transformers import AutoTokenizer

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    check_files(folder, read_report(folder))
    session = ort.open_session(folder / MODEL_FILE, threads or 0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = tokenizer(prompt).input_ids
    if not prompt_ids:
        raise ExportError("the prompt encodes to no tokens; pass some text")
    budget = new_tokens(len(prompt_ids), max_tokens, context_length(folder))
    tokens = ort.greedy_tokens(session, prompt_ids, budget, tokenizer.eos_token_id)
    return text_pieces(text_decoder(tokenizer), prompt_ids, tokens)


def generate(path: Path, prompt: str, max_tokens: int = 64, threads: int | None = None) -> str:
    """The whole continuation of ``stream``."""
    return "".join(stream(path, prompt, max_tokens, threads))
