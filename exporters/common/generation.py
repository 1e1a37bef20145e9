"""What `coalora-edge run` allows, the same for every runtime: a prompt must leave room in
the model's context, generation stops at the context's end (or at --max-tokens), and the
text comes out as it is generated."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from coalora_edge.errors import ExportError


def new_tokens(prompt_tokens: int, max_tokens: int, context: int) -> int:
    """How many tokens to generate after a prompt of ``prompt_tokens`` in a ``context``-token model."""
    if prompt_tokens >= context:
        raise ExportError(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: no room to "
                          f"generate; shorten the prompt to under {context} tokens")
    return min(max_tokens, context - prompt_tokens)


def text_pieces(decode: Callable[[list[int]], str], prompt_ids: list[int], tokens: Iterable[int]) -> Iterator[str]:
    """The text each new token adds after the prompt. Decoded with the prompt, not alone
    (SentencePiece-style decoders drop a leading space), and held back while it ends in
    U+FFFD: a character whose bytes span several tokens is not complete yet."""
    prompt_text, ids, shown = decode(prompt_ids), list(prompt_ids), 0
    for token in tokens:
        ids.append(token)
        text = decode(ids)[len(prompt_text):]
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    text = decode(ids)[len(prompt_text):]  # an incomplete character at the very end stays as decoded
    if len(text) > shown:
        yield text[shown:]
