"""Choose what a device runs: the bundle's configuration with the best validation quality
whose total memory fits the device profile.

    budget for the adapted matrices = memory - reserved - non-adapted tensors - KV cache
                                      - compute buffers - LoRA side-car (sidecar mode)

computed by :func:`memory.estimate_memory` with the adapted weights at zero, so the
resolver, the CLI and the exporters print the same numbers. Then:

1. Known configurations: every configuration the bundle measured on validation data. The
   lowest measured loss among those that fit the budget and store every matrix in a
   format the profile allows wins (ties: fewer bytes).
2. A new configuration, where the known ones leave the budget unused: when the best
   known one leaves more than ``NEAR_BITS`` bits per weight of the usable budget (the
   budget, or the largest allowed configuration if that is smaller) unused, or none fits.
   The exact knapsack on the bundle's cached sensitivities (:func:`best_config`) builds
   the configuration for exactly that budget; the configuration model generates its
   adapter, nothing is retrained. It was never measured: its loss is *predicted* from
   the measured front (loss against bits per weight, linear between front points), and
   it wins only when that prediction beats the best known one. Per-config bundles hold
   adapters for their known configurations only and skip this step.
3. Nothing fits: a one-line :class:`BudgetError` with the missing bytes and what would
   fit (the longest context that does, or a smaller model).

Speed floor: where the scheme has measured decode costs (gguf: llama.cpp's kernels), every
candidate, known or new, must also decode at least ``profile.min_decode_ratio`` times as
fast as the uniform-format configuration of its size, predicted (search/speed.py); the
knapsack builds new ones under that floor. 0 turns it off.

The base model's weights are never loaded: the tensors it stores besides the adapted
matrices come from its config, instantiated on PyTorch's meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
import torch
from torch import nn

from coalora_edge.bundle import SENSITIVITY, Bundle, BundleError
from coalora_edge.errors import BudgetError, ModelError, ProfileError, SchemeError
from coalora_edge.exporters.layout import base_bytes
from coalora_edge.memory import MemoryBreakdown, ModelDims, estimate_memory, sidecar_bytes
from coalora_edge.models import find_matrices, load_config
from coalora_edge.profiles import RUNTIMES, DeviceProfile, format_size
from coalora_edge.restore import evaluations
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.base import Scheme
from coalora_edge.search.ladder import Problem, best_config
from coalora_edge.search.sensitivity import Sensitivity
from coalora_edge.search.speed import DecodeSpeed, choice_indices, fast_config

#: A known configuration is "near" the budget when it leaves at most this much of the usable
#: budget unused. A quarter bit per weight is a quarter of the matrices one format up
#: (formats are about a bit apart): enough to be worth a configuration of its own.
NEAR_BITS = 0.25
#: the runtime that executes each scheme's formats (nf has none)
SCHEME_RUNTIME = {runtime.scheme: name for name, runtime in RUNTIMES.items()}


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
class ConfigSpace:
    """The configurations a bundle can ship: the measured ones and, unless its adapters are
    per configuration, any the knapsack builds. Pure data: no bundle, model or profile."""

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
            best = Choice(self.picks[k], int(self.nbytes[k]), float(self.loss[k]), "measured", _or_none(ratio[k]))
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
        return Choice(picks, solution.nbytes, loss, how, _or_none(speed.ratio(picks, solution.nbytes)) if speed else None)


def _or_none(value: float) -> float | None:
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


@dataclass(frozen=True)
class Resolution:
    """What runs on the device, and the memory it takes there."""

    profile: DeviceProfile
    config: dict[str, str]  # matrix -> chosen format (what QuantCache, restore and exporters take)
    stored: dict[str, str]  # matrix -> format the runtime stores it in (after llama.cpp's fallback)
    source: str  # "measured": a configuration the bundle evaluated; "new": built for this budget
    loss_is: str  # "measured", or "interpolated"/"extrapolated" from the measured front
    nbytes: int  # exact bytes of the adapted matrices
    bits_per_weight: float
    loss: float  # validation loss, measured or predicted
    weights_budget: int  # bytes the adapted matrices could take on this device
    memory: MemoryBreakdown
    #: predicted decode speed relative to the uniform-format configuration of the same size
    #: (search/speed.py); None where the scheme has no measured decode costs
    decode_ratio: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def headroom(self) -> int:
        return self.memory.headroom

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name, "runtime": self.profile.runtime, "source": self.source,
            "loss_is": self.loss_is, "bytes": self.nbytes, "bits_per_weight": self.bits_per_weight,
            "loss": self.loss, "perplexity": self.perplexity, "weights_budget": self.weights_budget,
            "headroom": self.headroom, "memory": self.memory.as_dict(), "decode_ratio": self.decode_ratio,
            "min_decode_ratio": self.profile.min_decode_ratio, "config": self.config, "stored": self.stored,
        }


@dataclass(frozen=True, eq=False)
class Resolver:
    """Everything resolving needs from one bundle, read once; :meth:`resolve` per profile."""

    bundle: Bundle
    space: ConfigSpace
    dims: ModelDims
    non_adapted: int | None  # bytes the scheme's runtime stores besides the adapted matrices
    lora: int  # bytes of the LoRA factors, counted when the runtime applies them (sidecar)

    @classmethod
    def from_bundle(cls, bundle: Bundle, model: str | None = None) -> Resolver:
        """``model``: the base model's folder if it moved since training (only its config is read)."""
        config = _model_config(model or bundle.manifest["base_model"]["source"])
        skeleton = _skeleton(config)
        _check_matrices(bundle, skeleton)
        shapes = {m.name: m.shape for m in bundle.matrices}
        runtime = SCHEME_RUNTIME.get(bundle.scheme)
        adapter = bundle.manifest["adapter"]
        return cls(
            bundle=bundle,
            space=_config_space(bundle),
            dims=ModelDims.from_config(config),
            non_adapted=base_bytes(skeleton, shapes.keys(), runtime) if runtime else None,
            lora=sidecar_bytes(shapes.values(), adapter["rank"]) if adapter["adapter_method"] != "none" else 0,
        )

    def breakdown(self, profile: DeviceProfile, weights_bytes: int = 0) -> MemoryBreakdown:
        return estimate_memory(profile, self.dims, weights_bytes=weights_bytes,
                               non_adapted_bytes=self.non_adapted, lora_bytes=self.lora)

    def resolve(self, profile: DeviceProfile) -> Resolution:
        """The configuration ``profile`` runs; raises rather than return one that does not fit."""
        self._check_runtime(profile)
        problem = self.space.problem
        allowed = allowed_formats(get_scheme(self.bundle.scheme), profile)
        budget = self.breakdown(profile).headroom
        choice = self.space.choose(budget, allowed, profile.min_decode_ratio)
        if choice is None:
            raise self._too_slow(profile, budget, allowed) or self._nothing_fits(profile, budget, allowed)
        memory = self.breakdown(profile, choice.nbytes)
        if not memory.fits:
            raise AssertionError(f"resolver bug: chose {choice.nbytes} bytes for a budget of {budget}")
        return Resolution(
            profile=profile,
            config={m: problem.choices[c] for m, c in zip(problem.matrices, choice.picks)},
            stored={m: str(problem.stored[i, c]) for i, (m, c) in enumerate(zip(problem.matrices, choice.picks))},
            source=choice.source, loss_is=choice.loss_is, nbytes=choice.nbytes,
            bits_per_weight=problem.bits_per_weight(choice.nbytes), loss=choice.loss,
            weights_budget=budget, memory=memory, decode_ratio=choice.decode_ratio,
        )

    def _check_runtime(self, profile: DeviceProfile) -> None:
        scheme = self.bundle.scheme
        if scheme not in SCHEME_RUNTIME:
            raise ProfileError(
                f"bundle {self.bundle.path} was trained with --scheme {scheme}, which no runtime executes; "
                "to ship it, retrain with --scheme gguf (llama.cpp) or --scheme onnx (onnxruntime)"
            )
        if profile.scheme != scheme:
            raise ProfileError(
                f"profile {profile.name} runs {profile.runtime}, which executes {profile.scheme} formats, but bundle "
                f"{self.bundle.path} holds {scheme} formats (for {SCHEME_RUNTIME[scheme]}); choose a profile with runtime "
                f"{SCHEME_RUNTIME[scheme]} or retrain with --scheme {profile.scheme}"
            )

    def _too_slow(self, profile: DeviceProfile, budget: int, allowed: list[str] | None) -> Exception | None:
        """When configurations fit but none is predicted fast enough: the error that says so."""
        fitting = self.space.choose(budget, allowed) if profile.min_decode_ratio > 0 else None
        if fitting is None:
            return None
        return BudgetError(
            f"no configuration that fits profile {profile.name} is predicted to decode at {profile.min_decode_ratio:g}x "
            f"the speed of a uniform-format one of its size (the best that fits: {fitting.decode_ratio:.2f}x); "
            "lower min_decode_ratio in the profile (0 turns the check off) or allow more formats"
        )

    def _nothing_fits(self, profile: DeviceProfile, budget: int, allowed: list[str] | None) -> Exception:
        smallest = self.space.smallest(allowed)
        if smallest is None:
            return ProfileError(
                f"none of the {len(self.space.loss)} configurations of per-config bundle {self.bundle.path} stores "
                f"every matrix in a format profile {profile.name} allows ({', '.join(profile.allowed_formats or ())}); "
                "allow more formats or train with --method coa"
            )
        missing = smallest - budget
        context = self._longest_context(profile, smallest)
        if context:
            fix = f"it fits with context_length {context} (instead of {profile.context_length})"
        else:
            fix = "even a 1-token context does not fit: use a smaller model or a device with more memory"
        if allowed is not None and self.space.smallest(None) <= budget:
            fix += ", or allow smaller formats"
        return BudgetError(
            f"nothing fits profile {profile.name}: the smallest {'allowed ' if allowed else ''}configuration "
            f"({format_size(smallest)} of weights) needs {missing:,} bytes ({format_size(missing)}) more than the "
            f"{profile.runtime} memory model leaves for the adapted matrices; {fix}"
        )

    def _longest_context(self, profile: DeviceProfile, weights_bytes: int) -> int | None:
        """The longest context shorter than the profile's at which ``weights_bytes`` fit."""

        def fits(context: int) -> bool:
            return self.breakdown(profile.model_copy(update={"context_length": context}), weights_bytes).fits

        if profile.context_length < 2 or not fits(1):
            return None
        lo, hi = 1, profile.context_length - 1  # fits(lo); the profile's own context does not fit
        while lo < hi:  # memory grows with the context: bisect for the last that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo


def resolve(bundle: Bundle, profile: DeviceProfile, model: str | None = None) -> Resolution:
    """The configuration of ``bundle`` that ``profile`` runs (see the module docstring)."""
    return Resolver.from_bundle(bundle, model).resolve(profile)


def allowed_formats(scheme: Scheme, profile: DeviceProfile | None) -> list[str] | None:
    """The scheme's formats ``profile`` allows; None: all of them."""
    return [f for f in scheme.formats if profile.allows(f)] if profile and profile.allowed_formats else None


def predicted_decode_ratio(bundle: Bundle, config: Mapping[str, str], profile: DeviceProfile | None) -> float | None:
    """``config``'s predicted decode speed over uniform of its size, against the uniform
    configurations of the bundle's choices that ``profile`` allows, as the resolver
    predicts it; None where the scheme has no decode costs or ``config`` leaves the choices."""
    scheme, problem = get_scheme(bundle.scheme), _problem(bundle)
    if not scheme.decode_cost or not set(config.values()) <= set(problem.choices):
        return None
    try:
        mask = problem.mask(allowed_formats(scheme, profile))
    except SchemeError:  # the profile cannot store some matrix (--config ignores it): nothing to compare with
        return None
    speed = DecodeSpeed.build(problem, mask, scheme.decode_cost)
    picks = np.array([problem.choices.index(config[m]) for m in problem.matrices])
    rows = np.arange(len(picks))
    return _or_none(speed.ratio(picks, problem.nbytes[rows, picks].sum())) if speed else None


def _problem(bundle: Bundle) -> Problem:
    sensitivity = Sensitivity.from_dict(bundle.read_json(SENSITIVITY))
    return Problem.build(get_scheme(bundle.scheme), {m.name: m.shape for m in bundle.matrices}, sensitivity)


def _config_space(bundle: Bundle) -> ConfigSpace:
    problem = _problem(bundle)
    index = {c: i for i, c in enumerate(problem.choices)}
    measured = bundle.evaluated()
    records = evaluations(bundle)
    picks = []
    for record in records:
        # a record names a measured configuration by index, or holds its own mapping
        config = measured[record["config"]] if isinstance(record["config"], int) else record["config"]
        unknown = sorted(set(config.values()) - index.keys())
        if unknown:
            raise BundleError(f"bundle {bundle.path}: a measured configuration uses {unknown[0]}, which "
                              f"{SENSITIVITY} does not cover; the bundle is inconsistent, retrain it")
        picks.append([index[config[m]] for m in problem.matrices])
    return ConfigSpace(
        problem=problem,
        picks=np.array(picks, dtype=np.int64).reshape(len(records), len(problem.matrices)),
        loss=np.array([r["loss"] for r in records], dtype=np.float64),
        # coa generates an adapter for any configuration, shared uses one for all, none has
        # none; per-config holds one per trained configuration only
        on_the_fly=bundle.manifest["adapter"]["method"] != "per-config",
        decode_cost=get_scheme(bundle.scheme).decode_cost,
    )


def _model_config(source: str) -> Any:
    """The base model's config: from its folder, or config.json alone from the hub."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "config.json")).parent
        except Exception as e:  # not found, network and auth errors all end the same way here
            raise ModelError(
                f"base model {source} is not a folder here and its config could not be fetched from the hub "
                f"({type(e).__name__}); pass --model with the folder of the model the bundle was trained on"
            ) from None
    return load_config(path)


def _skeleton(config: Any) -> nn.Module:
    """The model's parameters with shapes but no storage: what is stored, without the weights."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    # Initialising meta tensors still dispatches every init op: 0.4 s of 0.45 s for a 7B.
    # Skipping it also skips the tying of embeddings and head, which decides whether the
    # head is stored at all: tie again.
    with torch.device("meta"), no_init_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    return skeleton


def _check_matrices(bundle: Bundle, skeleton: nn.Module) -> None:
    expected = {m.name: m.shape for m in bundle.matrices}
    found = {m.name: m.shape for m in find_matrices(skeleton)}
    if found != expected:
        raise BundleError(
            f"the base model's config does not match bundle {bundle.path} (its adapted matrices differ in names or "
            f"shapes); pass --model with the model it was trained on ({bundle.manifest['base_model']['source']})"
        )
