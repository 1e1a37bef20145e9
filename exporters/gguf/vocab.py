"""A Hugging Face tokenizer as llama.cpp's vocabulary metadata.

Two kinds of BPE tokenizer.json are understood, the two that Llama- and Qwen-family
models ship:

* sentencepiece-style (``▁`` for spaces, byte fallback; Llama 2, Mistral, TinyStories):
  llama.cpp's ``llama`` vocabulary. Its tokenizer has no merge list: it repeatedly joins
  the adjacent pair whose joined text is the highest-scoring token. Scoring each token
  by minus the rank of the merge that creates it makes that the BPE merge order.
* byte-level (GPT-2 bytes-to-unicode; Llama 3, Qwen2): llama.cpp's ``gpt2`` vocabulary
  with the merge list and the name of the pre-tokenizer regex llama.cpp implements.

Token ids stay the model's: a vocabulary smaller than the embedding is padded with
unused tokens. Special tokens, whether BOS/EOS are added and the chat template come from
transformers' reading of the tokenizer files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from coalora_edge.errors import ModelError

SPACE = "\u2581"  # sentencepiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

#: byte-level pre-tokenizer regex (as tokenizer.json writes it) -> llama.cpp's name for it
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}
#: a ByteLevel pre-tokenizer with ``use_regex`` applies GPT-2's own regex
GPT2_PRE = "gpt-2"

#: special-token attribute of a transformers tokenizer -> GGUF key writer
SPECIAL_IDS = {
    "bos_token_id": gguf.GGUFWriter.add_bos_token_id,
    "eos_token_id": gguf.GGUFWriter.add_eos_token_id,
    "unk_token_id": gguf.GGUFWriter.add_unk_token_id,
    "pad_token_id": gguf.GGUFWriter.add_pad_token_id,
}


@dataclass(frozen=True)
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[gguf.TokenType]
    scores: list[float] | None  # llama only: merge priority
    merges: list[str]  # gpt2 only: "left right" in rank order
    add_space_prefix: bool  # llama only: a leading space is added to the text, as "▁" at its start
    special_ids: dict[str, int]  # SPECIAL_IDS key -> token id
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.merges:
            writer.add_token_merges(self.merges)
        for key, token_id in self.special_ids.items():
            SPECIAL_IDS[key](writer, token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The vocabulary of the tokenizer in ``model_dir``, padded to the model's ``vocab_size``."""
    from transformers import AutoTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            f"{model_dir} has no tokenizer.json, and llama.cpp needs the vocabulary inside the GGUF; save the "
            "model's fast tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{path} holds a {model.get('type')} tokenizer; the GGUF exporter reads BPE tokenizers only")
    byte_level = _mentions(spec, "ByteLevel")
    if not byte_level and not (model.get("byte_fallback") or _mentions(spec, SPACE)):
        raise ModelError(f"{path} is neither a byte-level nor a sentencepiece-style BPE; llama.cpp has no vocabulary for it")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = _tokens(spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank = {m.replace(" ", ""): i for i, m in reversed(list(enumerate(merges)))}  # a text's first merge wins
    add_bos, add_eos = _added_specials(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(
        model="gpt2" if byte_level else "llama",
        pre=_pre_tokenizer(spec, path) if byte_level else "default",
        tokens=tokens,
        types=types,
        scores=None if byte_level else [-float(rank[t]) if t in rank else 0.0 for t in tokens],
        merges=merges if byte_level else [],
        add_space_prefix=_prepends_space(spec),
        special_ids={k: v for k in SPECIAL_IDS if isinstance(v := getattr(tokenizer, k, None), int)},
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )


def _tokens(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Token texts and types by id; ids the tokenizer does not use become unused padding."""
    by_id: dict[int, tuple[str, gguf.TokenType]] = {}
    unk = spec["model"].get("unk_token")
    byte_fallback = bool(spec["model"].get("byte_fallback"))

    def kind(text: str, default: gguf.TokenType) -> gguf.TokenType:
        if text == unk:
            return gguf.TokenType.UNKNOWN
        # Byte pieces are BYTE even where the tokenizer lists them as special added tokens
        # (trainers given them as special_tokens do): llama.cpp spells unknown characters with them.
        if BYTE_TOKEN.fullmatch(text) and (byte_fallback or default == gguf.TokenType.NORMAL):
            return gguf.TokenType.BYTE
        return default

    for text, i in spec["model"]["vocab"].items():
        by_id[i] = (text, kind(text, gguf.TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        default = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind(added["content"], default))
    if max(by_id) >= vocab_size:
        raise ModelError(
            f"the tokenizer has token id {max(by_id)} but the model's vocabulary has {vocab_size} rows; "
            "the tokenizer belongs to another model"
        )
    pairs = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in pairs], [k for _, k in pairs]


def _pre_tokenizer(spec: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer's regex."""
    steps = _flatten(spec.get("pre_tokenizer") or {})
    patterns = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if not patterns and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return GPT2_PRE
    if len(patterns) == 1 and patterns[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[patterns[0]]
    raise ModelError(
        f"{path} splits text with a pre-tokenizer llama.cpp's exporter here does not know ({patterns[:1]}); "
        f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values()) | {GPT2_PRE}))}"
    )


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer adds "▁" before the text (a Prepend normalizer or Metaspace)."""
    steps = _flatten(spec.get("normalizer") or {}) + _flatten(spec.get("pre_tokenizer") or {})
    return any(
        (s.get("type") == "Prepend" and s.get("prepend") == SPACE)
        or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" and s.get("add_prefix_space", True))
        for s in steps
    )


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end, as transformers does it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _flatten(step: dict[str, Any]) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as a list of steps (Sequence expanded)."""
    nested = step.get("normalizers") or step.get("pretokenizers")
    return [s for inner in nested for s in _flatten(inner)] if nested else [step]


def _mentions(spec: dict[str, Any], text: str) -> bool:
    """Whether the tokenizer's normalizer, pre-tokenizer or decoder mentions ``text``."""
    return any(text in json.dumps(spec.get(part), ensure_ascii=False) for part in ("normalizer", "pre_tokenizer", "decoder"))
