"""The Pareto configuration search during training: rounds of measure, propose, select.

A round, at a training step (PAPER.md, "Pareto-based configuration search", fixed as
its "Defects" section asks):

1. re-measure the current training set with the *current* adapter on the fixed held-out
   blocks, so stale losses never decide;
2. fit the loss GP on every measurement so far and propose up to ``candidates`` new
   configurations by qLogEHVI (:mod:`coalora_edge.search.surrogate`);
3. measure them, with the same adapter on the same blocks;
4. segmented Pareto selection over this step's measurements -> the next training set.

Every measurement is kept (configuration, loss, the step it was taken at). Modes:

    none     the uniform configurations (one format everywhere), never refined
    ladder   the sensitivity budget ladder, never refined (the paper's frozen set)
    pareto   the ladder, refined in rounds (the paper)

The search plugs into :class:`coalora_edge.training.trainer.Trainer` as its ``refiner``; its state
is JSON and goes into checkpoints, so a resumed run searches exactly as an unbroken one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from coalora_edge.errors import CoaloraError
from coalora_edge.model.evaluate import LMScore
from coalora_edge.schemes.quantize import Configuration
from coalora_edge.search.front import Normalisation, front_mask, segmented_front
from coalora_edge.search.surrogate import MAX_MOVES, RESTARTS, Levels, Observations, LevelSpace, propose

MODES = ("auto", "none", "ladder", "pareto")


@dataclass
class SearchSettings:
    """How the training set is built and refined; saved in bundles."""

    mode: str = "auto"  # auto: pareto for a shared adapter on the ladder, else ladder
    rounds: int = 4  # refinement rounds, evenly spread over training (the last at its end)
    every: int = 0  # if > 0: a round every this many steps instead
    segments: int = 40  # bins of the bits axis in segmented selection (the paper's 40)
    candidates: int = 12  # new configurations proposed per round
    restarts: int = RESTARTS  # local searches per candidate, from random front points
    max_moves: int = MAX_MOVES  # steps of one local search

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"search must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.rounds >= 1, f"search rounds must be at least 1, got {self.rounds}"),
            (self.every >= 0, f"--search-every must be >= 0 steps, got {self.every}"),
            (self.segments >= 1, f"search segments must be at least 1, got {self.segments}"),
            (self.candidates >= 1, f"candidates per round must be at least 1, got {self.candidates}"),
            (self.restarts >= 1 and self.max_moves >= 1, "restarts and max_moves must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoaloraError(message)

    def resolve(self, method: str, budgets_given: bool) -> str:
        """The mode to run: ``auto`` refines only where it can and nobody fixed the set."""
        if self.mode == "auto":
            return "pareto" if method in ("coa", "shared") and not budgets_given else "ladder"
        if self.mode == "pareto" and method == "per-config":
            raise CoaloraError("--search pareto needs one adapter shared by all configurations; per-config trains "
                               "one per configuration: use --search ladder, or --method coa")
        if self.mode == "none" and budgets_given:
            raise CoaloraError("--search none trains on the uniform configurations; drop --budgets or use --search ladder")
        return self.mode

    def schedule(self, steps: int) -> list[int]:
        """Training steps after which rounds run (repeated when rounds outnumber steps)."""
        if self.every:
            return list(range(self.every, steps + 1, self.every)) or [steps]
        return [math.ceil(i * steps / self.rounds) for i in range(1, self.rounds + 1)]


def uniform_configs(space: LevelSpace) -> list[Configuration]:
    """Every level shared by all matrices, as one configuration each (by each choice)."""
    names = {name for options in space.options for name in options}
    configs = []
    for name in sorted(names, key=lambda n: [a.get(n, -1) for a in space.aliases]):
        if all(name in a for a in space.aliases):
            config = {m: name for m in space.matrices}
            if space.encode(config) not in {space.encode(c) for c in configs}:
                configs.append(config)
    return configs


@dataclass
class Measurement:
    levels: Levels
    loss: float
    perplexity: float
    tokens: int
    step: int  # adapter step it was measured at


class ConfigSearch:
    """Measurements and refinement rounds; the trainer calls :meth:`refine` after each step."""

    def __init__(self, space: LevelSpace, measure: Callable[[Configuration], LMScore], settings: SearchSettings,
                 schedule: Sequence[int], seed: int = 0):
        self.space, self.measure, self.settings = space, measure, settings
        self.schedule, self.seed = list(schedule), seed
        self.records: list[Measurement] = []
        self.rounds: list[dict[str, Any]] = []  # per round: step, measured, proposed, training_set, seconds
        self._index: dict[tuple[Levels, int], int] = {}

    @property
    def seconds(self) -> float:
        return sum(r["seconds"] for r in self.rounds)

    def measure_at(self, levels: Levels, step: int) -> int:
        """Index of the measurement of ``levels`` at ``step``, measuring it if new."""
        key = (tuple(levels), step)
        if key not in self._index:
            score = self.measure(self.space.decode(key[0]))
            self.records.append(Measurement(key[0], score.loss, score.perplexity, score.tokens, step))
            self._index[key] = len(self.records) - 1
        return self._index[key]

    # -- rounds ----------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """A pure function of ``step``: processes that never search agree with the one that does."""
        return step in self.schedule

    def refine(self, step: int, configs: Sequence[Configuration]) -> list[Configuration] | None:
        """The next training set after the rounds scheduled up to ``step``, or None if none was left."""
        new = None
        while len(self.rounds) < len(self.schedule) and self.schedule[len(self.rounds)] <= step:
            new = self.round(step, new or configs)
        return new

    def round(self, step: int, configs: Sequence[Configuration]) -> list[Configuration]:
        started = time.perf_counter()
        measured = [self.measure_at(self.space.encode(c), step) for c in configs]
        proposals = propose(self.space, self.observations(step), self.settings.candidates,
                            seed=self.seed * 1000 + len(self.rounds), restarts=self.settings.restarts,
                            max_moves=self.settings.max_moves)
        measured += [self.measure_at(p, step) for p in proposals]
        now = [i for i, r in enumerate(self.records) if r.step == step]
        kept = [now[i] for i in segmented_front(self.points(now), self.space.bits_range, self.settings.segments)]
        self.rounds.append({"step": step, "measured": measured, "proposed": len(proposals), "training_set": kept,
                            "seconds": time.perf_counter() - started})
        return [self.space.decode(self.records[i].levels) for i in kept]

    def finish(self, step: int, configs: Sequence[Configuration]) -> list[Configuration]:
        """Run the rounds training never reached (method none trains nothing); the final set."""
        self.schedule = [min(s, step) for s in self.schedule]
        return self.refine(step, configs) or list(configs)

    def observations(self, step: int) -> Observations:
        steps = np.array([r.step for r in self.records])
        return Observations(
            levels=np.array([r.levels for r in self.records], dtype=np.int64).reshape(len(self.records), -1),
            loss=np.array([r.loss for r in self.records]),
            age=(step - steps) / max(step, 1),
            current=steps == step,
        )

    def points(self, ids: Sequence[int]) -> np.ndarray:
        """(n, 2) bits per weight and loss of the given measurements."""
        rows = [[self.space.bits(np.array(self.records[i].levels)), self.records[i].loss] for i in ids]
        return np.array(rows, dtype=np.float64).reshape(-1, 2)

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "schedule": self.schedule,
                "records": [asdict(r) for r in self.records], "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["settings"] != asdict(self.settings) or state["schedule"] != self.schedule:
            raise CoaloraError("the checkpoint was made with other search options (--search...) or steps; "
                               "resume with the same options, or train afresh without --resume")
        self.records = [Measurement(**(r | {"levels": tuple(r["levels"])})) for r in state["records"]]
        self.rounds = state["rounds"]
        self._index = {(r.levels, r.step): i for i, r in enumerate(self.records)}

    # -- pareto.json -------------------------------------------------------------------

    def document(self, evaluated: Sequence[Levels], unquantized: LMScore, mode: str) -> dict[str, Any]:
        """pareto.json: every measurement, the front of the last step's, its hypervolume.

        ``evaluated`` lists the bundle's configurations: a record's ``config`` indexes it.
        Normalisation: bits over the whole range of the space; loss from the unquantized
        model's (or the best measured, if lower) to the worst measured.
        """
        if not self.records:
            raise CoaloraError("nothing was measured; the training set is empty")
        ids = list(range(len(self.records)))
        points = self.points(ids)
        last = max(r.step for r in self.records)
        final = [i for i in ids if self.records[i].step == last]
        lo_bits, hi_bits = self.space.bits_range
        anchors = [[lo_bits, unquantized.loss], [hi_bits, unquantized.loss]]
        norm = Normalisation.covering(np.vstack([points, anchors]))
        on_front = set(np.array(final)[front_mask(points[final])].tolist())
        position: dict[Levels, int] = {}
        for i, levels in enumerate(evaluated):
            position.setdefault(tuple(levels), i)
        evaluations = [{
            "config": position[r.levels], "bytes": int(self.space.size(np.array(r.levels))),
            "bits_per_weight": float(self.space.bits(np.array(r.levels))), "loss": r.loss, "perplexity": r.perplexity,
            "tokens": r.tokens, "step": r.step, "front": i in on_front,
        } for i, r in enumerate(self.records)]
        rounds = [{"step": r["step"], "measured": len(r["measured"]), "proposed": r["proposed"],
                   "training_set": len(r["training_set"]), "seconds": r["seconds"],
                   "hypervolume": norm.hypervolume(self.points(r["measured"]))} for r in self.rounds]
        return {
            "evaluations": evaluations,
            "unquantized": unquantized.as_dict(),
            "hypervolume": {"value": norm.hypervolume(points[final]), "step": last, **norm.as_dict()},
            "search": {"mode": mode, **{k: v for k, v in asdict(self.settings).items() if k != "mode"},
                       "rounds": rounds, "seconds": self.seconds},
        }
