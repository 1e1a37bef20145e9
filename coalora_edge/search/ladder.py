"""The initial configuration set: the best configuration (knapsack.py) for each budget of a
ladder from the smallest configuration to the largest, every ``step`` bits per weight."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Collection

import numpy as np

from coalora_edge.errors import BudgetError
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.problem import Problem, Solution


def ladder_budgets(problem: Problem, mask: np.ndarray, step: float = 0.1) -> list[int]:
    """Byte budgets from the smallest to the largest configuration: both ends exactly, and
    every multiple of ``step`` bits per weight strictly between."""
    lo, hi = problem.byte_range(mask)
    step_f = Fraction(str(step))
    if step_f <= 0:
        raise BudgetError(f"the ladder step must be positive, got {step} bits per weight")
    lo_bits, hi_bits = Fraction(8 * lo, problem.total_weights), Fraction(8 * hi, problem.total_weights)
    first, last = math.floor(lo_bits / step_f) + 1, math.ceil(hi_bits / step_f) - 1
    between = [problem.budget_bytes(k * step_f) for k in range(first, last + 1)]
    return sorted({lo, hi, *between})


def ladder(problem: Problem, step: float = 0.1, allowed: Collection[str] | None = None) -> list[Solution]:
    """The best configuration for every budget of the ladder, cheapest first; a
    configuration that several budgets share (same stored formats) is listed once."""
    budgets = ladder_budgets(problem, problem.mask(allowed), step)
    seen: set[tuple[str, ...]] = set()
    solutions = []
    for budget in budgets:
        solution = best_config(problem, budget, allowed)
        picks = [problem.choices.index(solution.config[m]) for m in problem.matrices]
        key = tuple(problem.stored[i, c] for i, c in enumerate(picks))
        if key not in seen:
            seen.add(key)
            solutions.append(solution)
    return solutions
