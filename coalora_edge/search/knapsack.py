"""The best configuration for one size budget: the one format per matrix that minimises
total sensitivity while the exact stored bytes fit the budget.

It is a multiple-choice knapsack: one choice per matrix,
``sum nbytes[m, c_m] <= budget``. Budgets are exact byte counts; a budget in bits per
weight (over the adapted weights) becomes ``floor(bits * numel / 8)`` bytes.

It is solved exactly, in three steps:

1. Lagrangian relaxation (the convex-hull greedy): bisection on the price of a byte gives
   the LP bound ``L`` and, with a greedy fill, a feasible incumbent. Any configuration
   costs at least ``L`` plus the reduced costs of its choices (``cost(x) >= L + R(x)``).
2. An exact dynamic program over the Pareto front of (bytes, cost) partial sums, which
   drops every partial configuration whose reduced costs already exceed a threshold
   ``t``. It finds the best configuration with ``R <= t``; if that costs at most
   ``L + t`` nothing dropped can beat it. Else ``t`` grows geometrically, but never past
   that configuration's own excess over ``L``, a threshold that provably keeps the
   optimum. Proven optimal: gap 0.
3. Should the front outgrow ``max_states``, HiGHS (``scipy.optimize.milp``, binary
   ``x[m, c]``) solves the reduced-cost core instead and reports its gap. HiGHS alone
   is exact too, but spends 50 ms - 1.5 s per budget on a 224 x 6 problem (cut loops
   and near-ties, even at 46 binaries), where the program takes a few milliseconds.

Both work on shifted copies: costs minus each matrix's cheapest choice; bytes minus its
smallest choice, divided by their common divisor (exact, and small integers for
HiGHS' integrality tolerance). HiGHS stops at an *absolute* gap of 1e-6 whatever
relative gap is asked, so its costs are scaled to a range of ``OBJECTIVE_SPAN``.
Reported numbers are recomputed from the original arrays.
"""

from __future__ import annotations

import math
from typing import Collection

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from coalora_edge.errors import BudgetError, InternalError
from coalora_edge.search.problem import Problem, Solution

OBJECTIVE_SPAN = 1e6  # HiGHS' cost range (its absolute stopping gap is 1e-6)
BISECTIONS = 64  # on the byte price: resolution 2^-64 of its range
#: slack, relative to the total cost range, for rounding in the bound and reduced costs
ELIMINATION_MARGIN = 1e-9
#: first threshold on reduced costs, as a fraction of the greedy incumbent's excess over
#: ``L``: small enough for a small front, and usually already provably enough
FIRST_CORE = 0.1
CORE_GROWTH = 4.0
#: largest Pareto front the dynamic program keeps before handing the core to HiGHS
MAX_STATES = 200_000


def _check_budget(problem: Problem, budget_bytes: int, lo: int, allowed: Collection[str] | None) -> None:
    if budget_bytes >= lo:
        return
    least = math.ceil(problem.bits_per_weight(lo) * 1e4) / 1e4
    raise BudgetError(
        f"a budget of {budget_bytes} bytes ({problem.bits_per_weight(budget_bytes):.4f} bits per weight) is "
        f"below the smallest configuration of {'the allowed' if allowed else 'all'} formats, {lo} bytes "
        f"({problem.bits_per_weight(lo):.4f} bits per weight); raise the budget to at least {least} bits "
        "per weight or allow smaller formats"
    )


def best_config(
    problem: Problem, budget_bytes: int, allowed: Collection[str] | None = None, max_states: int = MAX_STATES
) -> Solution:
    """The minimum-sensitivity configuration whose exact bytes are ``<= budget_bytes``.

    ``allowed`` restricts the stored formats (see :meth:`Problem.mask`); ``max_states``
    bounds the dynamic program's front before HiGHS takes over.
    """
    mask = problem.mask(allowed)
    lo, _ = problem.byte_range(mask)
    _check_budget(problem, budget_bytes, lo, allowed)
    cost, weight, spare = _shift(problem, mask, budget_bytes - lo)
    pick, slack = _solve(cost, weight, spare, max_states)
    n = np.arange(len(problem.matrices))
    nbytes = int(problem.nbytes[n, pick].sum())
    objective = float(problem.cost[n, pick].sum())
    return Solution(
        config={m: problem.choices[c] for m, c in zip(problem.matrices, pick)},
        nbytes=nbytes,
        bits_per_weight=problem.bits_per_weight(nbytes),
        objective=objective,
        bound=objective - slack,
        gap=slack / abs(objective) if objective else 0.0,
        budget_bytes=budget_bytes,
    )


def _shift(problem: Problem, mask: np.ndarray, spare_bytes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Cost and bytes above each matrix's floor (inf cost where not allowed), bytes and
    budget in units of the bytes' common divisor: flooring the budget loses nothing."""
    cost = np.where(mask, problem.cost, np.inf)  # (M, C)
    cost -= cost.min(axis=1, keepdims=True)
    smallest = np.where(mask, problem.nbytes, np.iinfo(np.int64).max).min(axis=1, keepdims=True)  # (M, 1)
    extra = np.where(mask, problem.nbytes - smallest, 0)  # (M, C)
    unit = int(np.gcd.reduce(extra, axis=None)) or 1
    return cost, extra // unit, spare_bytes // unit


def _solve(cost: np.ndarray, weight: np.ndarray, spare: int, max_states: int) -> tuple[np.ndarray, float]:
    """Choice index per matrix, optimal, and the remaining gap in cost units (0: proven)."""
    reduced, bound, incumbent = _lagrangian(cost, weight, spare)
    rows = np.arange(len(cost))
    # rounding in L and r must never cost the optimum its place
    margin = ELIMINATION_MARGIN * (float(cost.max(axis=1, where=np.isfinite(cost), initial=0).sum()) + 1e-300)
    threshold = max(0.0, cost[rows, incumbent].sum() - bound) * FIRST_CORE
    while True:
        pick = _pareto_program(cost, weight, spare, reduced, threshold + margin, max_states)
        if pick is None:
            core = np.isfinite(cost) & (reduced <= cost[rows, incumbent].sum() - bound + margin)
            return _solve_core(cost, weight, spare, core)
        excess = cost[rows, pick].sum() - bound
        if excess <= threshold:
            return pick, 0.0
        # grow geometrically, but never past the excess found: that one provably suffices
        threshold = min(excess, max(threshold * CORE_GROWTH, margin))


def _lagrangian(cost: np.ndarray, weight: np.ndarray, spare: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Reduced costs ``r`` (M, C), the bound ``L`` and a feasible incumbent (choice per matrix).

    For a byte price ``l >= 0`` and any ``x`` within budget, ``cost(x) >= L(l) + sum_m
    r_l[m, x_m]``. Bisection finds the lowest price whose Lagrangian solution fits; its
    ``L`` is the LP bound up to the bisection's resolution.
    """

    def relax(price: float) -> tuple[np.ndarray, np.ndarray]:
        value = cost + price * weight  # (M, C)
        return value, value.argmin(axis=1)

    rows = np.arange(len(cost))
    # at a price above every cost, each matrix takes its smallest choice, which fits
    lo, hi = 0.0, float(cost.max(where=np.isfinite(cost), initial=0)) + 1.0
    if weight[rows, relax(lo)[1]].sum() <= spare:
        hi = lo
    for _ in range(BISECTIONS if hi > lo else 0):
        mid = (lo + hi) / 2
        if weight[rows, relax(mid)[1]].sum() <= spare:
            hi = mid
        else:
            lo = mid
    value, best = relax(hi)
    bound = float(value[rows, best].sum() - hi * spare)
    return value - value[rows, best][:, None], bound, _fill(cost, weight, spare, best)


def _fill(cost: np.ndarray, weight: np.ndarray, spare: int, pick: np.ndarray) -> np.ndarray:
    """Greedily spend the bytes left on the upgrades that cut cost the most."""
    rows = np.arange(len(cost))
    pick = pick.copy()
    while True:
        slack = spare - weight[rows, pick].sum()
        fits = weight - weight[rows, pick][:, None] <= slack  # (M, C)
        gain = np.where(fits, cost[rows, pick][:, None] - cost, 0)  # (M, C)
        m, c = np.unravel_index(gain.argmax(), gain.shape)
        if gain[m, c] <= 0:
            return pick
        pick[m] = c


def _settle(viable: np.ndarray, weight: np.ndarray, spare: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Matrices with one viable choice are decided: (pick (M,), open rows, settled rows,
    budget left for the open ones)."""
    pick = viable.argmax(axis=1)  # (M,) right for settled rows
    open_rows = np.flatnonzero(viable.sum(axis=1) > 1)
    settled = np.setdiff1d(np.arange(len(viable)), open_rows)
    return pick, open_rows, settled, spare - int(weight[settled, pick[settled]].sum())


def _pareto_program(
    cost: np.ndarray, weight: np.ndarray, spare: int, reduced: np.ndarray, limit: float, max_states: int
) -> np.ndarray | None:
    """The cheapest configuration within budget whose reduced costs sum to ``<= limit``.

    States are partial configurations over the matrices seen so far, kept only on the
    Pareto front of (bytes, cost): one that uses more bytes for no less cost cannot lead
    anywhere better. None when the front outgrows ``max_states``.
    """
    viable = np.isfinite(cost) & (reduced <= limit)  # (M, C)
    pick, open_rows, settled, budget = _settle(viable, weight, spare)
    used = np.zeros(1, dtype=np.int64)  # (S,) bytes of each state
    total = np.zeros(1)  # (S,) cost of each state
    excess = np.full(1, reduced[settled, pick[settled]].sum())  # (S,) its reduced costs
    history = []
    for m in open_rows:
        options = np.flatnonzero(viable[m])  # (k,)
        u = (used[:, None] + weight[m, options]).ravel()  # (S * k,)
        t = (total[:, None] + cost[m, options]).ravel()
        e = (excess[:, None] + reduced[m, options]).ravel()
        ok = np.flatnonzero((u <= budget) & (e <= limit))
        ok = ok[np.lexsort((t[ok], u[ok]))]  # by bytes, then cost
        cheapest_so_far = np.minimum.accumulate(t[ok])
        front = ok[np.concatenate(([True], t[ok][1:] < cheapest_so_far[:-1]))]
        if len(front) > max_states:
            return None
        history.append((front // len(options), options[front % len(options)]))
        used, total, excess = u[front], t[front], e[front]
    state = int(np.argmin(total))
    for m, (parent, option) in zip(open_rows[::-1], history[::-1]):
        pick[m] = option[state]
        state = parent[state]
    return pick


def _solve_core(cost: np.ndarray, weight: np.ndarray, spare: int, keep: np.ndarray) -> tuple[np.ndarray, float]:
    """Choice index per matrix, optimal among ``keep``, and HiGHS' remaining gap (cost units)."""
    pick, free, _, spare = _settle(keep, weight, spare)
    if len(free) == 0:
        return pick, 0.0
    rows, cols = np.nonzero(keep[free])  # rows index ``free``
    c = cost[free[rows], cols]  # (K,)
    w = weight[free[rows], cols].astype(np.float64)  # (K,)
    span = float(np.ptp(c)) or 1.0
    scale = span / OBJECTIVE_SPAN
    one_hot = sparse.csr_array((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(free), len(rows)))
    while True:
        res = milp(
            c / scale,
            integrality=np.ones(len(rows)),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(w[None, :], -np.inf, spare)],
            options={"mip_rel_gap": 0},
        )
        if res.x is None:
            raise InternalError(f"HiGHS found no configuration although one fits ({res.message})")
        chosen = res.x > 0.5  # (K,)
        used = int(weight[free[rows[chosen]], cols[chosen]].sum())
        if used <= spare:
            break
        # HiGHS' integrality tolerance let a rounded solution overshoot: tighten and resolve.
        spare -= used - spare
    pick[free[rows[chosen]]] = cols[chosen]
    return pick, max(0.0, (res.fun - res.mip_dual_bound) * scale)
