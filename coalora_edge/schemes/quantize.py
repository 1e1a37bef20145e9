"""Whole-model quantization for a configuration, cached per (matrix, format).

Training switches configuration every step, so each matrix is quantized at most once
per format and later switches are dictionary look-ups. Misses are filled in parallel:
ggml's quantizer runs under ctypes and torch kernels release the GIL, so threads scale.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np
import torch

from coalora_edge.errors import SchemeError
from coalora_edge.schemes.base import Scheme

Configuration = Mapping[str, str]  # matrix name -> chosen format name


class QuantCache:
    """Dequantized weights (exactly what the runtime computes) per (matrix, stored format).

    Callers name the *chosen* format; the runtime's fallback for shapes a format cannot
    hold is applied inside (callers never see it unless they ask ``scheme.storage``), and
    choices that fall back to one type share one tensor.
    """

    def __init__(
        self,
        scheme: Scheme,
        weights: Mapping[str, torch.Tensor],
        imatrix: Mapping[str, torch.Tensor] | None = None,
        workers: int | None = None,
    ):
        self.scheme = scheme
        self.weights = weights
        self.imatrix = imatrix or {}
        self.workers = workers or os.cpu_count() or 1
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def quantizer(self, matrix: str, choice: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The quantize -> dequantize this cache applies to ``matrix`` for ``choice`` (fallback
        format, importance matrix and all), for other weights of its shape: merge-aware
        training rounds ``W + s B'A`` with exactly the call a merged export stores."""
        fmt = self.scheme.storage(choice, tuple(self.weights[matrix].shape))
        imatrix = self.imatrix.get(matrix) if fmt.uses_imatrix else None
        return (lambda weight: fmt.roundtrip(weight, imatrix)) if imatrix is not None else fmt.roundtrip

    def _compute(self, matrix: str, choice: str) -> torch.Tensor:
        return self.quantizer(matrix, choice)(self.weights[matrix])

    def _key(self, matrix: str, choice: str) -> tuple[str, str]:
        """Entries are keyed by the format actually stored: choices that fall back to the same
        type for this shape (gguf Q2_K and Q3_K -> Q4_0 on 576-wide rows) share one tensor."""
        return matrix, self.scheme.storage(choice, tuple(self.weights[matrix].shape)).name

    def get(self, matrix: str, choice: str) -> torch.Tensor:
        key = self._key(matrix, choice)
        if key not in self._cache:
            self._cache[key] = self._compute(matrix, choice)
        return self._cache[key]

    def for_config(self, config: Configuration) -> dict[str, torch.Tensor]:
        """Dequantized weights of every matrix in ``config``; misses computed in parallel."""
        unknown = set(config) - set(self.weights)
        if unknown:
            raise SchemeError(f"configuration names matrices the model lacks: {sorted(unknown)[:3]}")
        keys = {m: self._key(m, c) for m, c in config.items()}
        misses = list(dict.fromkeys(k for k in keys.values() if k not in self._cache))  # (matrix, stored format)
        if len(misses) > 1 and self.workers > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                done = pool.map(lambda mc: self._compute(*mc), misses)
                self._cache.update(zip(misses, done))
        else:
            for m, c in misses:
                self._cache[(m, c)] = self._compute(m, c)
        return {m: self._cache[k] for m, k in keys.items()}

    def __len__(self) -> int:
        return len(self._cache)


def bits_per_weight(nbytes: int | np.ndarray, weights: int) -> float | np.ndarray:
    """Stored bits per adapted weight, the unit of every budget and report: ``8 * bytes / weights``."""
    return 8 * nbytes / weights


def config_nbytes(scheme: Scheme, shapes: Mapping[str, tuple[int, int]], config: Configuration) -> int:
    """Exact bytes of the adapted matrices stored as ``config`` says (after fallback)."""
    return sum(scheme.storage(choice, shapes[m]).nbytes(shapes[m]) for m, choice in config.items())
