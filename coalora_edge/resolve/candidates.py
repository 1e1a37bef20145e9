"""The configurations a bundle can ship, as arrays: the measured ones and, unless its
adapters are per configuration, new ones the knapsack builds for a budget, with a loss
predicted from the measured front. Pure data: no bundle, model or profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np

from coalora_edge.errors import BundleError
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.problem import Problem
from coalora_edge.search.speed import DecodeSpeed, choice_indices, fast_config

#: A known configuration is "near" the budget when it leaves at most this much of the usable
#: budget unused. A quarter bit per weight is a quarter of the matrices one format up
#: (formats are about a bit apart): enough to be worth a configuration of its own.
NEAR_BITS = 0.25


@dataclass(frozen=True)
class Choice:
    """One configuration as the resolver sees it: choice index per matrix, bytes, loss."""

    picks: np.ndarray  # (M,) index into Problem.choices
    nbytes: int
    loss: float
    loss_is: str  # "measured", "interpolated" or "extrapolated"
    decode_ratio: float | None = None  # predicted decode speed / uniform of its size; None: no cost table

    @property
    def source(self) -> str:
        return "measured" if self.loss_is == "measured" else "new"


@dataclass(frozen=True, eq=False)
class Candidates:
    """The configurations a bundle can ship (see the module docstring)."""

    problem: Problem
    picks: np.ndarray  # (K, M) choice indices of the measured configurations
    loss: np.ndarray  # (K,) their validation loss
    on_the_fly: bool  # whether configurations beyond the measured ones have an adapter
    decode_cost: Mapping[str, float] | None = None  # the scheme's (Scheme.decode_cost)
    nbytes: np.ndarray = field(init=False)  # (K,) exact bytes of each measured configuration
    _known: frozenset = field(init=False)  # stored formats of each measured configuration

    def __post_init__(self) -> None:
        if not len(self.loss):  # new configurations are predicted from measured ones
            raise BundleError("the bundle records no measured configuration (pareto.json); retrain it")
        rows = np.arange(len(self.problem.matrices))
        object.__setattr__(self, "nbytes", self.problem.nbytes[rows, self.picks].sum(axis=1))
        object.__setattr__(self, "_known", frozenset(map(self._stored_key, self.picks)))

    def _stored_key(self, picks: np.ndarray) -> tuple[str, ...]:
        return tuple(self.problem.stored[np.arange(len(picks)), picks])

    def usable(self, mask: np.ndarray) -> np.ndarray:
        """(K,) bool: measured configurations whose every choice is in ``mask`` (Problem.mask)."""
        return mask[np.arange(mask.shape[0]), self.picks].all(axis=1)

    def smallest(self, allowed: Collection[str] | None) -> int | None:
        """Bytes of the smallest configuration that could ship; None if none uses only allowed formats."""
        mask = self.problem.mask(allowed)
        if self.on_the_fly:
            return self.problem.byte_range(mask)[0]
        usable = self.usable(mask)
        return int(self.nbytes[usable].min()) if usable.any() else None

    def speed(self, mask: np.ndarray) -> DecodeSpeed | None:
        """Predicted decode speed against the uniform configurations ``mask`` allows; None without costs."""
        return DecodeSpeed.build(self.problem, mask, self.decode_cost) if self.decode_cost else None

    def choose(self, budget: int, allowed: Collection[str] | None = None, min_decode_ratio: float = 0.0) -> Choice | None:
        """The best configuration within ``budget`` bytes of allowed stored formats that decodes
        at least ``min_decode_ratio`` times as fast as uniform of its size; None if none does."""
        mask = self.problem.mask(allowed)  # (M, C)
        speed = self.speed(mask)
        ratio = speed.ratio(self.picks, self.nbytes) if speed else np.full(len(self.loss), np.nan)  # (K,)
        usable = self.usable(mask) & ~(ratio < min_decode_ratio)  # no prediction (nan): no floor
        fitting = np.flatnonzero(usable & (self.nbytes <= budget))
        best = None
        if len(fitting):
            k = fitting[np.lexsort((self.nbytes[fitting], self.loss[fitting]))[0]]
            best = Choice(self.picks[k], int(self.nbytes[k]), float(self.loss[k]), "measured", or_none(ratio[k]))
        if self.on_the_fly and self._worth_building(budget, mask, best):
            new = self._build(budget, allowed, usable, speed, min_decode_ratio)
            if new is not None and (best is None or new.loss < best.loss):
                return new
        return best

    def _worth_building(self, budget: int, mask: np.ndarray, best: Choice | None) -> bool:
        lo, hi = self.problem.byte_range(mask)
        if budget < lo:
            return False
        return best is None or self.problem.bits_per_weight(min(budget, hi) - best.nbytes) > NEAR_BITS

    def _build(self, budget: int, allowed: Collection[str] | None, usable: np.ndarray, speed: DecodeSpeed | None,
               min_decode_ratio: float) -> Choice | None:
        """The knapsack's configuration for ``budget`` (fast enough), with a predicted loss;
        None if it is a known one or nothing within the budget is fast enough."""
        if speed is None or min_decode_ratio <= 0:
            solution = best_config(self.problem, budget, allowed)
        else:
            solution = fast_config(self.problem, budget, allowed, speed, min_decode_ratio)
            if solution is None:
                return None
        picks = choice_indices(self.problem, solution)
        if self._stored_key(picks) in self._known:
            return None  # measured already, and so already considered
        # Predict from what this device can run (allowed formats, fast enough) when the bundle
        # measured any of it: a front of unrestricted ones would flatter a restricted configuration.
        basis = usable if usable.any() else np.ones_like(usable)
        bits = np.array([self.problem.bits_per_weight(int(n)) for n in self.nbytes[basis]])
        loss, how = predict_loss(*measured_front(bits, self.loss[basis]), solution.bits_per_weight)
        return Choice(picks, solution.nbytes, loss, how, or_none(speed.ratio(picks, solution.nbytes)) if speed else None)


def or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def measured_front(bits: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The measured points no smaller one beats: bits strictly ascending, loss strictly descending."""
    order = np.lexsort((loss, bits))
    bits, loss = bits[order], loss[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], loss[:-1])))
    keep = loss < best_before
    return bits[keep], loss[keep]


def predict_loss(front_bits: np.ndarray, front_loss: np.ndarray, bits: float) -> tuple[float, str]:
    """Loss at ``bits`` per weight: linear between front points. Beyond the largest it
    stays at the largest's loss (more bits are not assumed to help); below the smallest
    it rises along the first segment's slope (staying flat there would flatter it)."""
    if front_bits[0] <= bits <= front_bits[-1]:
        return float(np.interp(bits, front_bits, front_loss)), "interpolated"
    if bits > front_bits[-1] or len(front_bits) == 1:
        return float(front_loss[-1] if bits > front_bits[-1] else front_loss[0]), "extrapolated"
    slope = (front_loss[1] - front_loss[0]) / (front_bits[1] - front_bits[0])
    return float(front_loss[0] + slope * (bits - front_bits[0])), "extrapolated"
