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
   The exact knapsack on the bundle's cached sensitivities (candidates.py) builds
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
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from torch import nn

from coalora_edge.bundle.lookup import evaluations
from coalora_edge.bundle.store import SENSITIVITY, Bundle, BundleError
from coalora_edge.errors import BudgetError, InternalError, ProfileError, SchemeError
from coalora_edge.model.dims import ModelDims
from coalora_edge.model.matrices import find_matrices
from coalora_edge.model.skeleton import meta_model, model_config
from coalora_edge.profiles import DeviceProfile
from coalora_edge.resolve.candidates import Candidates, or_none
from coalora_edge.resolve.memory import MemoryBreakdown, estimate_memory, sidecar_bytes
from coalora_edge.resolve.non_adapted import base_bytes
from coalora_edge.runtimes import RUNTIMES, for_scheme
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.base import Scheme
from coalora_edge.search.problem import Problem
from coalora_edge.search.sensitivity import Sensitivity
from coalora_edge.search.speed import DecodeSpeed
from coalora_edge.units import format_size

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
    space: Candidates
    dims: ModelDims
    non_adapted: int | None  # bytes the scheme's runtime stores besides the adapted matrices
    lora: int  # bytes of the LoRA factors, counted when the runtime applies them (sidecar)

    @classmethod
    def from_bundle(cls, bundle: Bundle, model: str | None = None) -> Resolver:
        """``model``: the base model's folder if it moved since training (only its config is read)."""
        config = model_config(model or bundle.manifest.base_model.source)
        skeleton = meta_model(config)
        _check_matrices(bundle, skeleton)
        shapes = {m.name: m.shape for m in bundle.matrices}
        runtime = for_scheme(bundle.scheme)
        adapter = bundle.manifest.adapter
        return cls(
            bundle=bundle,
            space=_config_space(bundle),
            dims=ModelDims.from_config(config),
            non_adapted=base_bytes(skeleton, shapes.keys(), runtime.name) if runtime else None,
            lora=sidecar_bytes(shapes.values(), adapter.rank) if adapter.adapter_method != "none" else 0,
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
            raise InternalError(f"resolver bug: chose {choice.nbytes} bytes for a budget of {budget}")
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
        runtime = for_scheme(scheme)
        if runtime is None:
            raise ProfileError(
                f"bundle {self.bundle.path} was trained with --scheme {scheme}, which no runtime executes; "
                "to ship it, retrain with "
                + " or ".join(f"--scheme {r.scheme} ({r.name})" for r in RUNTIMES.values())
            )
        if profile.scheme != scheme:
            raise ProfileError(
                f"profile {profile.name} runs {profile.runtime}, which executes {profile.scheme} formats, but bundle "
                f"{self.bundle.path} holds {scheme} formats (for {runtime.name}); choose a profile with runtime "
                f"{runtime.name} or retrain with --scheme {profile.scheme}"
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
    return or_none(speed.ratio(picks, problem.nbytes[rows, picks].sum())) if speed else None


def _problem(bundle: Bundle) -> Problem:
    sensitivity = Sensitivity.from_dict(bundle.read_json(SENSITIVITY))
    return Problem.build(get_scheme(bundle.scheme), {m.name: m.shape for m in bundle.matrices}, sensitivity)


def _config_space(bundle: Bundle) -> Candidates:
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
    return Candidates(
        problem=problem,
        picks=np.array(picks, dtype=np.int64).reshape(len(records), len(problem.matrices)),
        loss=np.array([r["loss"] for r in records], dtype=np.float64),
        # coa generates an adapter for any configuration, shared uses one for all, none has
        # none; per-config holds one per trained configuration only
        on_the_fly=bundle.manifest.adapter.method != "per-config",
        decode_cost=get_scheme(bundle.scheme).decode_cost,
    )


def _check_matrices(bundle: Bundle, skeleton: nn.Module) -> None:
    expected = {m.name: m.shape for m in bundle.matrices}
    found = {m.name: m.shape for m in find_matrices(skeleton)}
    if found != expected:
        raise BundleError(
            f"the base model's config does not match bundle {bundle.path} (its adapted matrices differ in names or "
            f"shapes); pass --model with the model it was trained on ({bundle.manifest.base_model.source})"
        )
