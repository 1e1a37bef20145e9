"""Perplexity of an exported artifact in its runtime, counted as :func:`evaluate.lm_score`
counts it (every next token within each block), so the three numbers a user compares
(PyTorch, llama.cpp, ONNX Runtime) measure the same thing."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from coalora_edge.exporters.gguf.llamacpp import Artifact, open_llama, runtime_logits
from coalora_edge.exporters.onnx import session as ort
from coalora_edge.runtimes import get_runtime


def _perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def _block_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token loss of logits ``(..., T, V)`` for ``ids (..., T)``, in fp64."""
    return torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, -2).double(), ids[..., 1:].flatten(),
                                             reduction="sum").item()


def llamacpp_perplexity(path: Path, blocks: torch.Tensor, threads: int | None = 1) -> float:
    """Perplexity of ``blocks (n, T)`` under the GGUF at ``path`` (a file or an export folder, its
    sidecar adapter applied); ``threads`` None is llama.cpp's default."""
    total = 0.0
    with open_llama(Artifact.find(path), n_ctx=blocks.shape[1], threads=threads) as llm:
        for block in blocks:
            total += _block_nll(runtime_logits(llm, block.tolist()), block)
    return _perplexity(total, blocks.numel() - len(blocks))


def onnx_perplexity(model: Path | bytes, blocks: torch.Tensor, threads: int | None = 1, batch: int = 8) -> float:
    """Perplexity of ``blocks (n, T)`` under an ONNX decoder (an export folder, a file, or serialized
    bytes); ``threads`` None is ONNX Runtime's default."""
    if isinstance(model, Path) and model.is_dir():
        model = model / get_runtime("onnxruntime").artifact
    session = ort.open_session(model, 0 if threads is None else threads)
    total = 0.0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]  # (b, T)
        total += _block_nll(torch.from_numpy(ort.logits(session, ids.numpy())), ids)
    return _perplexity(total, blocks.numel() - len(blocks))
