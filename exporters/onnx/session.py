"""Running an exported decoder in ONNX Runtime: sessions, logits through the KV cache,
and greedy decoding.

The graph is optimum's ``text-generation-with-past`` layout: inputs ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.{key,value}``
``[batch, kv_heads, past, head_dim]``; outputs ``logits`` and ``present.{i}.{key,value}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from coalora_edge.errors import ExportError

PAST, PRESENT = "past_key_values.", "present."


def open_session(model: Path | bytes, threads: int = 0):
    """A CPU InferenceSession (``threads`` 0: ORT's default); a file ORT cannot load is a
    damaged artifact: an ExportError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, ...)
        where = "the model" if isinstance(model, bytes) else str(model)
        raise ExportError(
            f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0]}; the file is damaged or "
            "needs a newer onnxruntime (2-bit MatMulNBits needs >= 1.24): re-export it"
        ) from None


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length caches; heads and head_dim are fixed numbers in the exported shapes."""
    past = {}
    for arg in session.get_inputs():
        if arg.name.startswith(PAST):
            _, heads, _, head_dim = arg.shape
            past[arg.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return past


def _step(session, ids: np.ndarray, past: dict[str, np.ndarray], start: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Feed ``ids (B, T)`` after ``start`` cached tokens; logits ``(B, T, V)`` and the new cache."""
    batch, length = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, start + length), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy(),
        **past,
    }
    wanted = {arg.name for arg in session.get_inputs()}
    names = [out.name for out in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))
    present = {PAST + k[len(PRESENT):]: v for k, v in outputs.items() if k.startswith(PRESENT)}
    return outputs["logits"], present


def logits(session, ids: np.ndarray) -> np.ndarray:
    """Logits ``(B, T, V)`` of one forward pass over ``ids (B, T)`` (no cached tokens)."""
    return _step(session, ids, _empty_past(session, ids.shape[0]), 0)[0]


def logits_through_cache(session, ids: np.ndarray) -> np.ndarray:
    """Logits ``(B, T, V)``: the prompt but its last token at once, then that token alone
    through the cache, so the comparison covers both the prefill and the decode graph."""
    head, past = _step(session, ids[:, :-1], _empty_past(session, ids.shape[0]), 0)
    tail, _ = _step(session, ids[:, -1:], past, ids.shape[1] - 1)
    return np.concatenate([head, tail], axis=1)


def greedy_tokens(session, prompt: list[int], max_tokens: int, eos: int | None) -> Iterator[int]:
    """Greedy decoding with the KV cache: the new tokens after ``prompt``, as they come."""
    ids, past, start = np.array([prompt]), _empty_past(session, 1), 0
    for _ in range(max_tokens):
        out, past = _step(session, ids, past, start)
        start += ids.shape[1]
        token = int(out[0, -1].argmax())
        yield token
        if token == eos:
            return
        ids = np.array([[token]])


def greedy(session, prompt: list[int], max_tokens: int, eos: int | None) -> list[int]:
    """The new tokens of ``greedy_tokens``, all at once."""
    return list(greedy_tokens(session, prompt, max_tokens, eos))
