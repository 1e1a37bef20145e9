"""What `coalora-edge run` allows, the same for every runtime: a prompt must leave room in
the model's context, and generation stops at the context's end (or at --max-tokens)."""

from __future__ import annotations

from coalora_edge.errors import ExportError


def new_tokens(prompt_tokens: int, max_tokens: int, context: int) -> int:
    """How many tokens to generate after a prompt of ``prompt_tokens`` in a ``context``-token model."""
    if prompt_tokens >= context:
        raise ExportError(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: no room to "
                          f"generate; shorten the prompt to under {context} tokens")
    return min(max_tokens, context - prompt_tokens)
