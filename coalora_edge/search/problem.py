"""The allocation problem: matrices x format choices, with each pair's exact stored bytes
and sensitivity, and the configurations solvers return for it (knapsack.py, ladder.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Collection, Mapping

import numpy as np

from coalora_edge.errors import SchemeError
from coalora_edge.schemes.base import Scheme, Shape
from coalora_edge.schemes.quantize import bits_per_weight
from coalora_edge.search.sensitivity import Sensitivity, stored_format


@dataclass(frozen=True, eq=False)
class Problem:
    """Matrices x choices, with exact bytes and sensitivity per pair."""

    matrices: tuple[str, ...]
    choices: tuple[str, ...]
    nbytes: np.ndarray  # (M, C) int64: exact stored bytes (meaningless where cost is inf)
    cost: np.ndarray  # (M, C) float64: sensitivity; inf where the choice cannot store the matrix
    numel: np.ndarray  # (M,) int64: weights per matrix
    #: (M, C) format actually stored (llama.cpp's fallback may replace the choice);
    #: allowed lists and deduplication compare these. Default: the choice itself.
    stored: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = (len(self.matrices), len(self.choices))
        if self.nbytes.shape != shape or self.cost.shape != shape or self.numel.shape != shape[:1]:
            raise SchemeError(
                f"problem arrays do not match {shape[0]} matrices x {shape[1]} choices: nbytes "
                f"{self.nbytes.shape}, cost {self.cost.shape}, numel {self.numel.shape}"
            )
        if self.stored is None:
            object.__setattr__(self, "stored", np.broadcast_to(np.array(self.choices, dtype=object), shape))

    @classmethod
    def build(cls, scheme: Scheme, shapes: Mapping[str, Shape], sensitivity: Sensitivity) -> Problem:
        """Exact bytes from the scheme for the matrices and choices of ``sensitivity``."""
        formats = [[stored_format(scheme, c, shapes[m]) for c in sensitivity.choices] for m in sensitivity.matrices]
        nbytes = [[f.nbytes(shapes[m]) if f else 0 for f in row] for m, row in zip(sensitivity.matrices, formats)]
        return cls(
            matrices=sensitivity.matrices,
            choices=sensitivity.choices,
            nbytes=np.array(nbytes, dtype=np.int64),
            cost=np.where([[f is not None for f in row] for row in formats], sensitivity.cost, np.inf),
            numel=np.array([shapes[m][0] * shapes[m][1] for m in sensitivity.matrices], dtype=np.int64),
            stored=np.array([[f.name if f else "" for f in row] for row in formats], dtype=object),
        )

    @property
    def total_weights(self) -> int:
        return int(self.numel.sum())

    def bits_per_weight(self, nbytes: int) -> float:
        return bits_per_weight(nbytes, self.total_weights)

    def budget_bytes(self, bits_per_weight: float | Fraction) -> int:
        """Bits per weight -> the byte budget, exactly: ``floor(bits * numel / 8)``."""
        bits = bits_per_weight if isinstance(bits_per_weight, Fraction) else Fraction(str(bits_per_weight))
        return math.floor(bits * self.total_weights / 8)

    def mask(self, allowed: Collection[str] | None = None) -> np.ndarray:
        """(M, C) bool: the choices that can store each matrix, in an allowed stored format.

        ``allowed`` names stored formats (what a device must run); names no matrix uses are
        fine, so a device's full list of supported types can be passed as is.
        """
        mask = np.isfinite(self.cost)
        if allowed is not None:
            mask &= np.isin(self.stored, list(allowed))
        empty = np.flatnonzero(~mask.any(axis=1))
        if len(empty):
            m = empty[0]
            could = sorted({s for s, ok in zip(self.stored[m], np.isfinite(self.cost[m])) if ok})
            raise SchemeError(
                f"no allowed format can store {self.matrices[m]} (allowed: {sorted(allowed or self.choices)}; "
                f"its choices are stored as {could}); allow one of those"
            )
        return mask

    def byte_range(self, mask: np.ndarray) -> tuple[int, int]:
        """Exact bytes of the smallest and of the largest configuration within ``mask``."""
        big = np.iinfo(np.int64).max
        lo = int(np.where(mask, self.nbytes, big).min(axis=1).sum())
        hi = int(np.where(mask, self.nbytes, -1).max(axis=1).sum())
        return lo, hi


@dataclass(frozen=True)
class Solution:
    """One configuration with its exact size and how sure the solver is of it."""

    config: dict[str, str]  # matrix -> chosen format (what QuantCache and exporters take)
    nbytes: int  # exact stored bytes of the adapted matrices
    bits_per_weight: float
    objective: float  # total sensitivity
    bound: float  # proven lower bound on the objective at this budget
    gap: float  # (objective - bound) / |objective|; 0 when proven optimal
    budget_bytes: int  # the budget it was solved for (the lowest one, after deduplication)
