"""Pareto fronts of (bits per weight, loss), both minimised: the front, its hypervolume,
and the segmented selection that turns measurements into the next training set.

Hypervolume is measured in normalised space: each objective is mapped by
``(v - lo) / (hi - lo)``, and the reference point sits ``REFERENCE_MARGIN`` beyond
``hi`` (at 1.1, 1.1), so a point at the worst observed values still adds area. A
hypervolume means nothing without its normalisation and reference point: every
function that reports one takes them, and :meth:`Normalisation.as_dict` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coalora_edge.errors import CoaloraError

#: reference point, in normalised coordinates, just beyond the worst point (1, 1)
REFERENCE_MARGIN = 0.1
OBJECTIVES = ("bits_per_weight", "loss")


def front_mask(points: np.ndarray) -> np.ndarray:
    """(n,) bool: points (n, 2) that no other point dominates (<= both, < one; minimised).

    Identical points do not dominate each other: both stay on the front.
    """
    points = np.asarray(points, dtype=np.float64)
    le = (points[None, :, :] <= points[:, None, :]).all(axis=2)  # (n, n): j at least as good as i
    lt = (points[None, :, :] < points[:, None, :]).any(axis=2)  # (n, n): j better somewhere
    return ~(le & lt).any(axis=1)


def hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by ``points`` (n, 2) and bounded by ``reference`` (2,), minimising both.

    Points not strictly better than the reference in both objectives add nothing.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = points[(points < reference).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    front = inside[front_mask(inside)]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]  # by x, then y
    area, ceiling = 0.0, float(reference[1])
    # Sweep x upwards: each front point adds the strip between its y and the lowest y so far.
    for x, y in front:
        if y < ceiling:
            area += (reference[0] - x) * (ceiling - y)
            ceiling = y
    return float(area)


@dataclass(frozen=True)
class Normalisation:
    """Per-objective affine map to [0, 1]: ``lo`` (ideal) -> 0, ``hi`` (worst) -> 1."""

    lo: tuple[float, float]
    hi: tuple[float, float]

    def __post_init__(self) -> None:
        if not all(h > l for l, h in zip(self.lo, self.hi)):
            raise CoaloraError(f"normalisation needs hi > lo for every objective, got lo {self.lo}, hi {self.hi}")

    @classmethod
    def covering(cls, points: np.ndarray, lo: tuple[float | None, float | None] = (None, None)) -> Normalisation:
        """From the observed range of ``points`` (n, 2); ``lo`` fixes ideal values where known."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        low = [float(points[:, i].min()) if l is None else float(l) for i, l in enumerate(lo)]
        high = [max(float(points[:, i].max()), low[i]) for i in range(2)]
        # a degenerate objective (one value) still needs a unit: keep its points at 0
        high = [h if h > l else l + 1.0 for l, h in zip(low, high)]
        return cls(tuple(low), tuple(high))

    def apply(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (points - np.array(self.lo)) / (np.array(self.hi) - np.array(self.lo))

    @property
    def reference(self) -> np.ndarray:
        return np.full(2, 1.0 + REFERENCE_MARGIN)

    def hypervolume(self, points: np.ndarray) -> float:
        return hypervolume_2d(self.apply(points), self.reference)

    def as_dict(self) -> dict:
        return {"objectives": list(OBJECTIVES), "lo": list(self.lo), "hi": list(self.hi),
                "reference_point": self.reference.tolist(), "space": "normalised, both minimised"}


def segmented_front(points: np.ndarray, bits_range: tuple[float, float], segments: int) -> np.ndarray:
    """Indices (sorted by bits) of the points kept by segmented Pareto selection.

    The bits axis over ``bits_range`` is cut into ``segments`` equal bins; in each bin the
    points that no other point *of that bin* dominates are kept. Unlike the global front
    this keeps configurations spread over every budget, so training covers them all.
    """
    if segments < 1:
        raise CoaloraError(f"segments must be at least 1, got {segments}")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lo, hi = bits_range
    width = (hi - lo) / segments if hi > lo else 1.0
    bins = np.clip(np.floor((points[:, 0] - lo) / width), 0, segments - 1).astype(np.int64)  # (n,)
    keep = np.zeros(len(points), dtype=bool)
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        keep[members[front_mask(points[members])]] = True
    kept = np.flatnonzero(keep)
    return kept[np.lexsort((points[kept, 1], points[kept, 0]))]
