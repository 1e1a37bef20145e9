"""Decode speed as a constraint on configurations: predicted from the scheme's measured
decode cost per format, against the uniform-format configuration of the same size.

Single-token decode multiplies every weight matrix by one vector, so a configuration's
decode time is predicted as

    time(c)      = sum over matrices m of  numel[m] * decode_cost[format m is stored in]
    reference(B) = time of the uniform configurations (every matrix in one choice),
                   linear in bytes between the two whose sizes bracket B
    ratio(c)     = reference(bytes(c)) / time(c)     1: as fast as uniform of its size

**Same size.** A uniform file exists only at each format's own size. Between two of them,
the reference is the configuration that stores a matching share of the weights in each
of the two: its bytes and its time are both linear in that share, so its time is the
linear interpolation. At a format's own size it is exactly that uniform file, the
comparison the speed target names. Where two uniform configurations have the same size
the faster one counts; outside the range of uniform sizes the nearest end does. The
nearest uniform *below* would not do: it jumps at every format's size (a configuration
just under Q5_K's size would be held to Q4_K's speed, one at it to Q5_K's).

The cost of a format is per weight and relative (Q4_K = 1 for gguf); time's unit drops
out of the ratio. Costs are measured where they differ most, on a model that fits in the
CPU cache (compute-bound). Larger models are memory-bound: time follows bytes, and
configurations of the same size decode about alike (K-quant mixes of a 111M-parameter
model at 1.05-1.09x uniform Q4_K, RUNTIME_FACTS.md), so the floor is conservative there.

The resolver asks for ``ratio >= min_ratio``. Its knapsack gets the floor by Lagrangian
relaxation (:func:`fast_config`): sensitivity plus a price on predicted time, at the
lowest price whose configuration is fast enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Collection, Mapping

import numpy as np

from coalora_edge.errors import SchemeError
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.problem import Problem, Solution

#: Prices tried by :func:`fast_config`, in units that make the spans of sensitivity and
#: time equal: bisection in log2 between these ends. 12 halvings of 40 octaves leave
#: steps under 1% of the price.
PRICE_RANGE = (2.0**-20, 2.0**20)
PRICE_BISECTIONS = 12


@dataclass(frozen=True, eq=False)
class DecodeSpeed:
    """Predicted decode time of every choice, and the uniform configurations to compare with."""

    time: np.ndarray  # (M, C) numel x cost of the stored format; inf where the choice is masked out
    ref_bytes: np.ndarray  # (U,) strictly ascending bytes of the uniform configurations
    ref_time: np.ndarray  # (U,) their predicted time (the fastest of any that share a size)

    @classmethod
    def build(cls, problem: Problem, mask: np.ndarray, decode_cost: Mapping[str, float]) -> DecodeSpeed | None:
        """From ``problem``'s stored formats; the references are the uniform configurations
        ``mask`` allows (Problem.mask). None if it allows no uniform configuration."""
        missing = sorted({str(s) for s in problem.stored[mask]} - decode_cost.keys())
        if missing:
            raise SchemeError(f"no measured decode cost for {', '.join(missing)}; add it to the scheme's decode_cost "
                              "table or turn the speed check off (min_decode_ratio: 0)")
        cost = np.vectorize(lambda s: decode_cost.get(s, np.nan), otypes=[np.float64])(problem.stored)  # (M, C)
        time = np.where(mask, problem.numel[:, None] * cost, np.inf)
        uniform = np.flatnonzero(mask.all(axis=0))  # choices every matrix may take
        if not len(uniform):
            return None
        nbytes, seconds = problem.nbytes[:, uniform].sum(axis=0), time[:, uniform].sum(axis=0)
        order = np.lexsort((seconds, nbytes))  # by size, the fastest first within a size
        nbytes, seconds = nbytes[order], seconds[order]
        first = np.concatenate(([True], nbytes[1:] != nbytes[:-1]))
        return cls(time, nbytes[first], seconds[first])

    def config_time(self, picks: np.ndarray) -> np.ndarray:
        """Predicted time of configurations ``picks`` (..., M) of choice indices."""
        return self.time[np.arange(len(self.time)), np.asarray(picks)].sum(axis=-1)

    def reference(self, nbytes: np.ndarray | int) -> np.ndarray:
        """Predicted time of the uniform configuration of ``nbytes`` (see the module docstring)."""
        return np.interp(nbytes, self.ref_bytes, self.ref_time)

    def ratio(self, picks: np.ndarray, nbytes: np.ndarray | int) -> np.ndarray:
        """Decode speed relative to uniform of the same size (> 1: faster)."""
        return self.reference(nbytes) / self.config_time(picks)


def choice_indices(problem: Problem, solution: Solution) -> np.ndarray:
    index = {c: i for i, c in enumerate(problem.choices)}
    return np.array([index[solution.config[m]] for m in problem.matrices])


def fast_config(problem: Problem, budget_bytes: int, allowed: Collection[str] | None, speed: DecodeSpeed,
                min_ratio: float) -> Solution | None:
    """The least sensitive configuration within budget whose decode ratio is at least
    ``min_ratio``, as far as a price on time finds it; None if even the highest price's is too slow.

    Raising the price never makes the knapsack's configuration slower (the Lagrangian
    argument; the reference moves with its bytes, so the ratio follows only nearly), and
    bisection finds about the lowest price that is fast enough. That is not proven
    optimal for two constraints: its ``bound`` is the unconstrained optimum's. Against
    brute force on 3000 random problems (2-6 matrices, 2-4 choices, random costs, floor
    0.95) it found the optimum 2910 times, else 2% more sensitivity (median), and
    returned None twice where a fast enough configuration existed (references whose
    speed jumps between two close uniform sizes; ggml's types are farther apart).
    """
    free = best_config(problem, budget_bytes, allowed)

    def fast(solution: Solution) -> bool:
        return bool(speed.ratio(choice_indices(problem, solution), solution.nbytes) >= min_ratio)

    if fast(free):
        return free
    finite = np.isfinite(speed.time) & np.isfinite(problem.cost)
    unit = _span(problem.cost, finite) / _span(speed.time, finite)

    def priced(price: float) -> Solution:
        return best_config(replace(problem, cost=problem.cost + price * unit * np.where(finite, speed.time, 0.0)),
                           budget_bytes, allowed)

    lo, hi = map(math.log2, PRICE_RANGE)
    found = priced(2.0**hi)
    if not fast(found):
        return None
    for _ in range(PRICE_BISECTIONS):
        mid = (lo + hi) / 2
        solution = priced(2.0**mid)
        lo, hi, found = (lo, mid, solution) if fast(solution) else (mid, hi, found)
    rows = np.arange(len(problem.matrices))
    objective = float(problem.cost[rows, choice_indices(problem, found)].sum())
    return replace(found, objective=objective, bound=free.objective,
                   gap=(objective - free.objective) / abs(objective) if objective else 0.0)


def _span(values: np.ndarray, finite: np.ndarray) -> float:
    """How far the total can move: the sum over matrices of each one's range of values."""
    hi = np.where(finite, values, -np.inf).max(axis=1)
    lo = np.where(finite, values, np.inf).min(axis=1)
    return float((hi - lo).sum()) or 1.0
