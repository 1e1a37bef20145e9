"""The budget ladder against brute-force enumeration, and its exact byte accounting
against ``quantize.config_nbytes`` on the real model's shapes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from coalora_edge.errors import BudgetError, SchemeError
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.knapsack import MAX_STATES, best_config
from coalora_edge.search.ladder import ladder, ladder_budgets
from coalora_edge.search.problem import Problem
from coalora_edge.search.sensitivity import Sensitivity

#: the two exact solvers: the Pareto program, and HiGHS on the core (a front of 0 states)
SOLVERS = {"pareto": MAX_STATES, "highs": 0}


def random_problem(rng: np.random.Generator, n_matrices: int, n_choices: int, unstorable: float = 0.0) -> Problem:
    """Sizes roughly proportional to bits, costs falling with bits: the knapsacks the
    ladder meets, with noise so that greedy choices are wrong and ties are rare."""
    numel = rng.integers(1, 40, n_matrices) * 256
    bits = np.sort(rng.uniform(2, 9, n_choices))
    nbytes = (numel[:, None] * bits / 8).astype(np.int64) + rng.integers(0, 300, (n_matrices, n_choices))
    cost = numel[:, None] * np.exp(-bits) * rng.lognormal(0, 1, (n_matrices, 1)) * rng.uniform(0.7, 1.3, nbytes.shape)
    cost[rng.random(cost.shape) < unstorable] = np.inf
    cost[:, 0] = np.where(np.isfinite(cost).any(axis=1), cost[:, 0], 1.0)  # every matrix keeps a choice
    return Problem(
        matrices=tuple(f"m{i}" for i in range(n_matrices)),
        choices=tuple(f"c{j}" for j in range(n_choices)),
        nbytes=nbytes,
        cost=cost,
        numel=numel,
    )


def enumerate_all(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every configuration: (picks (N, M), bytes (N,), cost (N,))."""
    m, c = problem.cost.shape
    picks = np.array(list(itertools.product(range(c), repeat=m)))  # (C^M, M)
    rows = np.arange(m)
    return picks, problem.nbytes[rows, picks].sum(axis=1), problem.cost[rows, picks].sum(axis=1)


def brute_force(problem: Problem, budget: int, allowed: set[str] | None = None) -> float:
    picks, nbytes, cost = enumerate_all(problem)
    ok = nbytes <= budget
    if allowed is not None:
        ok &= np.isin(problem.stored[np.arange(len(problem.matrices)), picks], list(allowed)).all(axis=1)
    return float(cost[ok].min())


def picks_of(problem: Problem, config: dict[str, str]) -> np.ndarray:
    return np.array([problem.choices.index(config[m]) for m in problem.matrices])


def check_solution(problem: Problem, solution, budget: int) -> None:
    """Exact bytes and objective recomputed from the configuration; within budget."""
    picks = picks_of(problem, solution.config)
    rows = np.arange(len(problem.matrices))
    assert solution.nbytes == int(problem.nbytes[rows, picks].sum()) <= budget
    assert solution.objective == float(problem.cost[rows, picks].sum())
    assert solution.bits_per_weight == 8 * solution.nbytes / problem.numel.sum()


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("seed", range(6))
def test_optimum_equals_brute_force_at_every_budget(seed, solver):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 6, 3, unstorable=0.1 if seed % 2 else 0.0)
    _, all_bytes, all_costs = enumerate_all(problem)
    lo, hi = problem.byte_range(problem.mask())
    # exact sizes of configurations (the edge where a budget just fits one), neighbours, and a spread
    budgets = {*rng.choice(all_bytes[np.isfinite(all_costs)], 12), *np.linspace(lo, hi, 12).astype(int)}
    budgets |= {b - 1 for b in budgets if b > lo}
    for budget in sorted(int(b) for b in budgets):
        solution = best_config(problem, budget, max_states=SOLVERS[solver])
        check_solution(problem, solution, budget)
        assert solution.objective == pytest.approx(brute_force(problem, budget), rel=1e-12)
        assert solution.gap <= 1e-12 and solution.bound <= solution.objective
        if solver == "pareto":
            assert solution.gap == 0.0 and solution.bound == solution.objective


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_allowed_formats_are_respected(solver):
    rng = np.random.default_rng(7)
    problem = random_problem(rng, 6, 4)
    allowed = {"c1", "c3"}
    lo, hi = problem.byte_range(problem.mask(allowed))
    assert lo > problem.byte_range(problem.mask())[0]
    for budget in np.linspace(lo, hi, 10).astype(int):
        solution = best_config(problem, int(budget), allowed, max_states=SOLVERS[solver])
        check_solution(problem, solution, int(budget))
        assert set(solution.config.values()) <= allowed
        assert solution.objective == pytest.approx(brute_force(problem, int(budget), allowed), rel=1e-12)


def test_ladder_spans_the_range_monotone_and_deduplicated():
    problem = random_problem(np.random.default_rng(3), 24, 6, unstorable=0.05)
    solutions = ladder(problem, step=0.1)
    lo, hi = problem.byte_range(problem.mask())
    assert solutions[0].budget_bytes == lo and solutions[0].nbytes == lo
    # the top of the ladder is every matrix at its least sensitive choice
    assert solutions[-1].objective == pytest.approx(problem.cost.min(axis=1).sum(), rel=1e-12)
    for s in solutions:
        check_solution(problem, s, s.budget_bytes)
        assert s.gap == 0.0
    for a, b in itertools.pairwise(solutions):
        assert a.budget_bytes < b.budget_bytes
        assert b.objective <= a.objective
    assert len({tuple(s.config.values()) for s in solutions}) == len(solutions)
    assert len(solutions) > 20


def test_ladder_budgets_are_exact_multiples_of_the_step():
    problem = random_problem(np.random.default_rng(4), 5, 4)
    lo, hi = problem.byte_range(problem.mask())
    budgets = ladder_budgets(problem, problem.mask(), step=0.25)
    n = int(problem.numel.sum())
    between = [k * n // 32 for k in range(1, 1000) if 8 * lo < k * n / 4 < 8 * hi]  # floor(k/4 * n / 8)
    assert budgets == [lo, *between, hi]
    assert problem.budget_bytes(2.3) == 23 * n // 80 and problem.budget_bytes(0.1 * 3) == 3 * n // 80


def test_budget_below_the_smallest_configuration_names_the_minimum():
    problem = random_problem(np.random.default_rng(5), 6, 3)
    lo, _ = problem.byte_range(problem.mask())
    least = math.ceil(8 * lo / problem.numel.sum() * 1e4) / 1e4
    assert best_config(problem, problem.budget_bytes(least)).nbytes == lo
    with pytest.raises(BudgetError, match=rf"below the smallest .* at least {least} bits per weight"):
        best_config(problem, lo - 1)
    lo_allowed, _ = problem.byte_range(problem.mask({"c2"}))
    with pytest.raises(BudgetError, match=f"the allowed formats, {lo_allowed} bytes"):
        best_config(problem, lo_allowed - 1, {"c2"})


def test_an_allowed_list_that_leaves_a_matrix_nothing_is_refused():
    problem = random_problem(np.random.default_rng(6), 4, 3)
    problem.cost[2, 1:] = np.inf
    with pytest.raises(SchemeError, match=r"no allowed format can store m2 .* stored as \['c0'\]"):
        best_config(problem, int(problem.nbytes.sum()), {"c1", "c2"})


def test_real_shapes_bytes_match_config_nbytes_and_fallbacks_deduplicate(own_model):
    matrices = find_matrices(load_model(str(own_model)))  # TinyStories-656K's shapes
    shapes = {m.name: m.shape for m in matrices}
    scheme = get_scheme("gguf")
    rng = np.random.default_rng(8)
    bits = np.array([scheme.format(c).nominal_bits_per_weight for c in scheme.default_choices])
    cost = rng.uniform(0.5, 2, (len(matrices), 1)) * np.exp(-bits)  # (14, 6)
    sens = Sensitivity("activation", tuple(shapes), scheme.default_choices, cost)
    problem = Problem.build(scheme, shapes, sens)
    # rows of 128 and 384: every K-quant falls back, and Q2_K / Q3_K both become Q4_0
    assert set(problem.stored[:, 0]) == set(problem.stored[:, 1]) == {"Q4_0"}
    solutions = ladder(problem, step=0.05)
    for s in solutions:
        assert s.nbytes == config_nbytes(scheme, shapes, s.config) <= s.budget_bytes
    stored = [tuple(scheme.storage(c, shapes[m]).name for m, c in s.config.items()) for s in solutions]
    assert len(set(stored)) == len(stored)
    assert solutions[0].nbytes == config_nbytes(scheme, shapes, dict.fromkeys(shapes, "Q2_K"))
    assert solutions[-1].nbytes == config_nbytes(scheme, shapes, dict.fromkeys(shapes, "Q8_0"))


def test_every_budget_on_224_matrices_by_6_formats_is_proven_optimal():
    # a Llama-7B-sized space; how fast it is solved is bench/resolve_speed.py's to measure
    problem = random_problem(np.random.default_rng(9), 224, 6)
    lo, hi = problem.byte_range(problem.mask())
    for budget in np.linspace(lo, hi, 12).astype(int)[1:-1]:
        solution = best_config(problem, int(budget))
        assert solution.gap == 0.0 and solution.nbytes <= budget
