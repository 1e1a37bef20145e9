"""The search space, the discrete local search, and refinement rounds on a synthetic
problem whose Pareto front is known exactly."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from coalora_edge.errors import CoaloraError
from coalora_edge.model.evaluate import LMScore
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search import rounds as rounds_module, surrogate as refine
from coalora_edge.search.front import Normalisation, front_mask, hypervolume_2d
from coalora_edge.search.problem import Problem
from coalora_edge.search.rounds import ConfigSearch, SearchSettings, uniform_configs
from coalora_edge.search.sensitivity import Sensitivity
from coalora_edge.search.surrogate import LevelSpace, acquisition, fit_loss_model, local_search

# TinyStories-656K's shapes: rows of 128 and 384 (K-quants need 256: llama.cpp falls back)
SHAPES = {"q": (128, 128), "o": (128, 128), "up": (384, 128), "down": (128, 384), "k": (64, 128)}


def real_space(scheme_name: str) -> tuple[LevelSpace, Problem]:
    scheme = get_scheme(scheme_name)
    choices = scheme.choices()
    cost = np.random.default_rng(0).uniform(1, 2, (len(SHAPES), len(choices)))
    problem = Problem.build(scheme, SHAPES, Sensitivity("activation", tuple(SHAPES), choices, cost))
    return LevelSpace.from_problem(problem), problem


@pytest.mark.parametrize("scheme_name", ["gguf", "onnx"])
def test_space_levels_are_exact_sizes_and_fallbacks_share_a_level(scheme_name):
    space, problem = real_space(scheme_name)
    scheme = get_scheme(scheme_name)
    rng = np.random.default_rng(1)
    for _ in range(20):
        config = {m: problem.choices[c] for m, c in zip(SHAPES, rng.integers(len(problem.choices), size=len(SHAPES)))}
        levels = space.encode(config)
        assert space.size(np.array(levels)) == config_nbytes(scheme, SHAPES, config)
        assert space.encode(space.decode(levels)) == levels
    for m, options in enumerate(space.options):
        sizes = space.nbytes[m, : space.levels[m]]
        assert np.all(np.diff(sizes) >= 0)  # fewest bytes first
        stored = {scheme.storage(o, SHAPES[space.matrices[m]]).name for o in options}
        assert len(stored) == len(options)  # one level per stored format
        for a in problem.choices:  # choices share a level exactly when the runtime stores them alike
            for b in problem.choices:
                same = problem.stored[m, problem.choices.index(a)] == problem.stored[m, problem.choices.index(b)]
                assert (space.aliases[m][a] == space.aliases[m][b]) == same
    # K-quants cannot hold rows of 128, llama.cpp falls back: fewer levels than choices
    assert (space.levels[0] < len(problem.choices)) == (scheme_name == "gguf")


def test_neighbours_move_one_matrix_one_level_and_stay_in_range():
    space, _ = real_space("onnx")
    top = space.levels - 1
    near = space.neighbours(top)
    assert len(near) == len(SHAPES)  # at the top edge only the way down
    assert np.all(np.abs(near - top).sum(axis=1) == 1) and np.all(near <= top)
    middle = np.ones(len(SHAPES), dtype=np.int64)
    assert len(space.neighbours(middle)) == 2 * len(SHAPES)


def test_local_search_climbs_from_range_edges_and_skips_measured_points():
    space, _ = real_space("onnx")
    target = np.array([3, 0, 7, 11, 5])

    def value(levels):  # concave and separable: true finite differences climb straight to it
        return -np.abs(np.asarray(levels) - target).sum(axis=1).astype(float)

    top, bottom = space.levels - 1, np.zeros(len(SHAPES), dtype=np.int64)
    for start in (top, bottom):  # at an edge a one-sided difference sees no slope; neighbours do
        point, best = local_search(value, space, start[None], seen=set(), max_moves=100)
        assert point.tolist() == target.tolist() and best == 0
    point, _ = local_search(value, space, top[None], seen={tuple(target)}, max_moves=100)
    assert tuple(point) != tuple(target) and value(point[None])[0] == -1
    assert local_search(value, space, target[None], seen=set()) is None  # nothing beats a local optimum


# -- a synthetic problem with a known front ----------------------------------------------

M, BITS = 8, np.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0])


def synthetic():
    """Loss = 2 + sum of per-matrix errors that fall 4x per bit: the front is exact by DP."""
    rng = np.random.default_rng(0)
    numel = rng.choice([4096, 16384, 65536], M)
    nbytes = (numel[:, None] * BITS[None] / 8).astype(np.int64)
    cost = (np.exp(rng.normal(0, 1.5, M)) * numel / numel.mean())[:, None] * 4.0 ** (2 - BITS[None])
    problem = Problem(tuple(f"m{i}" for i in range(M)), tuple(f"q{b:g}" for b in BITS), nbytes, cost, numel)
    space = LevelSpace.from_problem(problem)

    def measure(config):
        loss = 2.0 + cost[np.arange(M), list(space.encode(config))].sum()
        return LMScore(loss, math.exp(loss), 1)

    front = np.zeros((1, 2))  # every Pareto-optimal (bytes, error) sum, matrix by matrix
    for m in range(M):
        front = (front[:, None, :] + np.stack([nbytes[m], cost[m]], axis=1)[None]).reshape(-1, 2)
        front = front[front_mask(front)]
    front = np.column_stack([8 * front[:, 0] / numel.sum(), 2.0 + front[:, 1]])
    return space, measure, front


def run_rounds(space, measure, rounds, state=None):
    search = ConfigSearch(space, measure, SearchSettings(rounds=rounds, candidates=6), [0] * rounds, seed=0)
    configs = uniform_configs(space)  # a poor start: one format everywhere
    if state is not None:
        search.load_state_dict(state)
        configs = [space.decode(search.records[i].levels) for i in search.rounds[-1]["training_set"]]
    search.refine(0, configs)
    return search


@pytest.fixture(scope="module")
def three_rounds():
    space, measure, true_front = synthetic()
    return space, measure, true_front, run_rounds(space, measure, rounds=3)


def test_refinement_improves_hypervolume_round_over_round_toward_the_true_front(three_rounds):
    space, measure, true_front, search = three_rounds
    norm = Normalisation.covering(np.vstack([true_front, [[space.bits_range[1], 2.0]]]))
    hv = [norm.hypervolume(search.points(r["measured"])) for r in search.rounds]
    start = norm.hypervolume(search.points(range(len(uniform_configs(space)))))
    assert all(r["proposed"] == 6 for r in search.rounds)
    assert start < hv[0] and all(a < b for a, b in zip(hv, hv[1:])), hv
    best = norm.hypervolume(true_front)
    assert hv[-1] - start > 0.5 * (best - start), (start, hv, best)  # over half the gap closed in 3 x 6 measurements


def test_reference_codes_origin_reference_point_never_moves(monkeypatch):
    """The reference code: objectives negated (all <= 0), reference point (0, 0). Nothing
    can dominate it, so the hypervolume is empty, every improvement is zero (its log only
    round-off) and the search proposes nothing: round after round the same set."""
    space, measure, _ = synthetic()
    monkeypatch.setattr(rounds_module, "propose", functools.partial(refine.propose, ref_point=np.zeros(2)))
    search = run_rounds(space, measure, rounds=3)
    assert all(r["proposed"] == 0 for r in search.rounds)
    assert len({tuple(r["training_set"]) for r in search.rounds}) == 1
    # its hypervolume, in minimisation form: normalised points (>= 0) against (0, 0)
    points = search.points(range(len(search.records)))
    assert hypervolume_2d(Normalisation.covering(points).apply(points), np.zeros(2)) == 0.0
    obs = search.observations(0)
    x = torch.rand(32, 1, M + 1, dtype=torch.float64)
    origin = acquisition(space, fit_loss_model(space, obs), obs, ref_point=np.zeros(2))
    beyond = acquisition(space, fit_loss_model(space, obs), obs)  # just beyond the worst point
    with torch.no_grad():
        assert origin(x).exp().max() < 1e-12 < 1e-6 < beyond(x).exp().max()


def test_a_resumed_search_continues_exactly(three_rounds):
    space, measure, _, unbroken = three_rounds
    state = unbroken.state_dict()
    # the checkpoint a run killed after its second round left
    taken = max(max(r["measured"]) for r in state["rounds"][:2]) + 1
    killed = state | {"records": state["records"][:taken], "rounds": state["rounds"][:2]}
    resumed = run_rounds(space, measure, rounds=3, state=json.loads(json.dumps(killed)))
    assert resumed.state_dict()["records"] == state["records"]
    with pytest.raises(CoaloraError, match="other search options"):
        ConfigSearch(space, measure, SearchSettings(candidates=5), [0, 0]).load_state_dict(killed)


def test_schedule_and_modes():
    assert SearchSettings(rounds=4).schedule(100) == [25, 50, 75, 100]
    assert SearchSettings(rounds=4).schedule(2) == [1, 1, 2, 2]  # rounds outnumber steps: several at a step
    assert SearchSettings(every=30).schedule(100) == [30, 60, 90]
    assert SearchSettings().resolve("coa", budgets_given=False) == "pareto"
    assert SearchSettings().resolve("coa", budgets_given=True) == "ladder"
    assert SearchSettings().resolve("per-config", budgets_given=False) == "ladder"
    with pytest.raises(CoaloraError, match="per-config trains one per configuration"):
        SearchSettings(mode="pareto").resolve("per-config", budgets_given=False)
    with pytest.raises(CoaloraError, match="drop --budgets"):
        SearchSettings(mode="none").resolve("coa", budgets_given=True)
    with pytest.raises(CoaloraError, match="search must be one of"):
        SearchSettings(mode="random")
