"""New configurations worth measuring: a Gaussian-process surrogate of the loss and
qLogEHVI maximised by a discrete local search over the choice vector.

A configuration is a vector of *levels*, one per matrix: the index of its stored format
among that matrix's distinct stored formats, fewest bytes first (llama.cpp's fallback
can make two choices store alike; they are one level). The GP sees levels scaled to
[0, 1] plus the *age* of each measurement (0: measured with the current adapter, 1:
with the first), so every measurement ever taken informs it while predictions are made
for the adapter as it is now. Bits are exact, never modelled: the acquisition computes
them from the candidate itself.

Objectives (both minimised) are normalised by the range of the current measurements;
qLogEHVI maximises their negatives, with the reference point just beyond the worst
current point. The reference code put it at (0, 0) with all-negative objectives: no
point ever improves on it, so the hypervolume is empty and the search never moves.

The local search takes true finite differences: from a point it evaluates the
acquisition on every neighbour (one matrix one level up or down; at a range edge the
one existing direction) in one batch, moves to the best while that improves, and stops
at a local optimum or after ``max_moves``. Restarts begin at random points of the
current front and climb together (one batched acquisition call per move). The
candidates of a round are chosen one after another, each conditioned on the ones before.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Mapping

import numpy as np
import torch

from coalora_edge.schemes.quantize import Configuration, bits_per_weight
from coalora_edge.search.front import Normalisation, front_mask
from coalora_edge.search.problem import Problem

MC_SAMPLES = 64  # quasi-MC samples of the loss posterior per acquisition value
RESTARTS = 4
MAX_MOVES = 32
#: log of the smallest expected hypervolume improvement worth a measurement, as a
#: fraction of the normalised box: below it the acquisition is numerically flat (its
#: smoothed log still orders candidates, but by round-off, not by any improvement)
MIN_LOG_IMPROVEMENT = math.log(1e-6)

Levels = tuple[int, ...]  # one level per matrix: a hashable configuration


@dataclass(frozen=True, eq=False)
class LevelSpace:
    """Per matrix, its distinct stored formats ordered by bytes ("levels")."""

    matrices: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]  # per matrix: the choice name standing for each level
    nbytes: np.ndarray  # (M, L) int64 bytes per level; rows padded with their last level
    levels: np.ndarray  # (M,) levels per matrix
    aliases: tuple[Mapping[str, int], ...]  # per matrix: every choice name -> its level
    total_weights: int

    @classmethod
    def from_problem(cls, problem: Problem, allowed: Collection[str] | None = None) -> LevelSpace:
        mask = problem.mask(allowed)
        options, nbytes, aliases = [], [], []
        for m in range(len(problem.matrices)):
            stored: dict[str, list[int]] = {}  # stored format -> the choices that give it
            for c in np.flatnonzero(mask[m]):
                stored.setdefault(problem.stored[m, c], []).append(int(c))
            # fewest bytes first; equal bytes: the more sensitive (worse) first
            order = sorted(stored.values(), key=lambda cs: (problem.nbytes[m, cs[0]], -problem.cost[m, cs[0]]))
            options.append(tuple(problem.choices[cs[0]] for cs in order))
            nbytes.append([int(problem.nbytes[m, cs[0]]) for cs in order])
            aliases.append({problem.choices[c]: level for level, cs in enumerate(order) for c in cs})
        width = max(len(row) for row in nbytes)
        padded = np.array([row + row[-1:] * (width - len(row)) for row in nbytes], dtype=np.int64)
        return cls(problem.matrices, tuple(options), padded, np.array([len(o) for o in options]),
                   tuple(aliases), problem.total_weights)

    def encode(self, config: Configuration) -> Levels:
        return tuple(self.aliases[m][config[name]] for m, name in enumerate(self.matrices))

    def decode(self, levels: Levels) -> dict[str, str]:
        return {name: self.options[m][lv] for m, (name, lv) in enumerate(zip(self.matrices, levels))}

    def size(self, levels: np.ndarray) -> np.ndarray:
        """Exact stored bytes of level vectors (..., M)."""
        levels = np.asarray(levels)
        flat = levels.reshape(-1, len(self.matrices))  # (n, M)
        return np.take_along_axis(self.nbytes, flat.T, axis=1).sum(axis=0).reshape(levels.shape[:-1])

    def bits(self, levels: np.ndarray) -> np.ndarray:
        """Exact bits per weight of level vectors (..., M)."""
        return bits_per_weight(self.size(levels), self.total_weights)

    @property
    def bits_range(self) -> tuple[float, float]:
        return float(self.bits(np.zeros(len(self.matrices), dtype=np.int64))), float(self.bits(self.levels - 1))

    def unit(self, levels: np.ndarray) -> np.ndarray:
        """Levels (..., M) scaled to [0, 1] per matrix (0 for a matrix with one level)."""
        return np.asarray(levels) / np.maximum(self.levels - 1, 1)

    def from_unit(self, x: torch.Tensor) -> np.ndarray:
        return torch.round(x.detach() * torch.as_tensor(np.maximum(self.levels - 1, 1))).long().cpu().numpy()

    def neighbours(self, levels: np.ndarray) -> np.ndarray:
        """(k, M): one matrix one level up or down, within range."""
        M = len(self.matrices)
        moves = np.concatenate([np.eye(M, dtype=np.int64), -np.eye(M, dtype=np.int64)])  # (2M, M)
        out = np.asarray(levels)[None, :] + moves
        return out[((out >= 0) & (out < self.levels)).all(axis=1)]


@dataclass(frozen=True)
class Observations:
    """Every measurement: levels (n, M), loss (n,), age (n,) in [0, 1], current (n,) bool."""

    levels: np.ndarray
    loss: np.ndarray
    age: np.ndarray
    current: np.ndarray  # measured with the current adapter: these define the front

    def current_points(self, space: LevelSpace) -> np.ndarray:
        """(k, 2) bits per weight and loss of the current measurements."""
        return np.stack([space.bits(self.levels[self.current]), self.loss[self.current]], axis=1)

    def plus(self, levels: np.ndarray, loss: float) -> Observations:
        """With one more current measurement."""
        return Observations(np.vstack([self.levels, levels]), np.append(self.loss, loss),
                            np.append(self.age, 0.0), np.append(self.current, True))


def fit_loss_model(space: LevelSpace, obs: Observations):
    """A GP of the loss over (levels in [0, 1], age), hyper-parameters by marginal likelihood."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    x = torch.as_tensor(np.column_stack([space.unit(obs.levels), obs.age]), dtype=torch.float64)  # (n, M + 1)
    y = torch.as_tensor(obs.loss, dtype=torch.float64)[:, None]  # (n, 1)
    model = SingleTaskGP(x, y, outcome_transform=Standardize(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # botorch's notes on optimiser restarts, not errors
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def acquisition(space: LevelSpace, model, obs: Observations, ref_point: np.ndarray | None = None):
    """qLogEHVI over (-bits, -loss) normalised by the current points' range.

    ``ref_point`` (maximisation space) defaults to just beyond the worst current point.
    """
    from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
    from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
    from botorch.sampling import SobolQMCNormalSampler
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    norm = Normalisation.covering(obs.current_points(space))
    lo, span = np.array(norm.lo), np.array(norm.hi) - np.array(norm.lo)
    M = len(space.matrices)

    def objectives(samples: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        # samples (S, b, q, 1) of the loss; X (b, q, M + 1): exact bits from the levels
        bits = torch.as_tensor(space.bits(space.from_unit(X[..., :M])), dtype=samples.dtype)  # (b, q)
        neg_bits = -(bits - lo[0]) / span[0]
        neg_loss = -(samples[..., 0] - lo[1]) / span[1]  # (S, b, q)
        return torch.stack([neg_bits.expand_as(neg_loss), neg_loss], dim=-1)  # (S, b, q, 2)

    ref = torch.as_tensor(-norm.reference if ref_point is None else ref_point, dtype=torch.float64)
    observed = -torch.as_tensor(norm.apply(obs.current_points(space)), dtype=torch.float64)  # (k, 2)
    return qLogExpectedHypervolumeImprovement(
        model, ref, FastNondominatedPartitioning(ref, observed),
        sampler=SobolQMCNormalSampler(torch.Size([MC_SAMPLES]), seed=0),
        objective=GenericMCMultiOutputObjective(objectives),
    )


def local_search(value: Callable[[np.ndarray], np.ndarray], space: LevelSpace, starts: np.ndarray,
                 seen: set[Levels], max_moves: int = MAX_MOVES) -> tuple[np.ndarray, float] | None:
    """Hill-climb from each of ``starts`` (R, M) at once over neighbours not in ``seen``.

    The best point any climb reached, with its value; None if no climb ever moved.
    """
    points, best = starts.copy(), value(starts)  # (R, M), (R,)
    moved, active = np.zeros(len(points), dtype=bool), np.ones(len(points), dtype=bool)
    for _ in range(max_moves):
        near = {r: [n for n in space.neighbours(points[r]) if tuple(n) not in seen] for r in np.flatnonzero(active)}
        near = {r: np.array(n) for r, n in near.items() if n}
        active[:] = False
        if not near:
            break
        values = np.split(value(np.concatenate(list(near.values()))), np.cumsum([len(n) for n in near.values()])[:-1])
        for (r, candidates), v in zip(near.items(), values):
            i = int(np.argmax(v))
            if v[i] > best[r]:
                points[r], best[r], moved[r], active[r] = candidates[i], v[i], True, True
    if not moved.any():
        return None
    r = int(np.flatnonzero(moved)[np.argmax(best[moved])])
    return points[r], float(best[r])


def propose(space: LevelSpace, obs: Observations, n: int, seed: int = 0, restarts: int = RESTARTS,
            max_moves: int = MAX_MOVES, ref_point: np.ndarray | None = None) -> list[Levels]:
    """Up to ``n`` new configurations (never measured ones), best expected improvement first.

    Candidates are chosen one at a time; each is then believed to score its predicted
    mean (the "Kriging believer"), so the next one looks elsewhere. This keeps every
    acquisition value a q = 1 computation: a joint q-batch costs 2^q box terms.
    Fewer than ``n`` when no neighbourhood of the front promises a material improvement
    (``MIN_LOG_IMPROVEMENT``).
    """
    with _quiet_torch(seed):
        return _propose(space, obs, n, seed, restarts, max_moves, ref_point)


@contextlib.contextmanager
def _quiet_torch(seed: int) -> Iterator[None]:
    """Seeded, and on one thread: the GP's tensors are tiny, and on a busy machine extra
    threads only spin (measured: 5x slower with 2 threads on 2 shared cores). Training's
    random streams and thread count are restored after."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _propose(space: LevelSpace, obs: Observations, n: int, seed: int, restarts: int, max_moves: int,
             ref_point: np.ndarray | None) -> list[Levels]:
    model = fit_loss_model(space, obs)
    seen = {tuple(int(v) for v in row) for row in obs.levels}
    rng = np.random.default_rng(seed)
    chosen: list[Levels] = []
    for _ in range(n):
        value = functools.partial(_acquisition_value, acquisition(space, model, obs, ref_point), space)
        current = obs.levels[obs.current]
        front = current[front_mask(obs.current_points(space))]  # (f, M)
        starts = front[rng.choice(len(front), size=min(restarts, len(front)), replace=False)]
        found = local_search(value, space, starts, seen, max_moves)
        if found is None or found[1] < MIN_LOG_IMPROVEMENT:
            break
        point = found[0]
        chosen.append(tuple(int(v) for v in point))
        seen.add(chosen[-1])
        x = _inputs(space, point[None])  # (1, M + 1)
        with torch.no_grad():
            believed = model.posterior(x).mean  # (1, 1)
        model = model.condition_on_observations(x, believed)
        obs = obs.plus(point, float(believed))
    return chosen


def _acquisition_value(acq, space: LevelSpace, levels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return acq(_inputs(space, levels)[:, None, :]).numpy()  # (k,)


def _inputs(space: LevelSpace, levels: np.ndarray) -> torch.Tensor:
    """GP inputs (k, M + 1) of level vectors (k, M), predicted for the current adapter (age 0)."""
    return torch.as_tensor(np.column_stack([space.unit(levels), np.zeros(len(levels))]), dtype=torch.float64)
