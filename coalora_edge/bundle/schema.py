"""What a bundle's files must hold, checked when it is loaded.

The sha256 list in ``manifest.json`` proves the other files are the ones it names, but
nothing proves the manifest itself: a hand-edited or hostile bundle can rewrite both. So
every JSON file a later command reads is validated here (types, ranges, and agreement
with the manifest's matrices and formats), and the safetensors files are opened to their
headers. Anything wrong is one :class:`BundleError`, never a KeyError deep inside
`restore` or a tensor of the wrong length handed to ggml.

Validation is strict (JSON types as written, no "4" for 4) because callers read the
parsed JSON itself, not the validated copy.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from coalora_edge.adapter.config_model import CONFIG_MODELS
from coalora_edge.adapter.methods import TRAINING_METHODS
from coalora_edge.errors import BundleError, SchemeError
from coalora_edge.schemes import get_scheme

#: the matrix-count, rank and layer bounds no real model reaches: past them a value is damage
MAX_ITEMS = 1 << 20
MAX_SIDE = 1 << 24


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be a finite number")
    return x


Finite = Annotated[float, AfterValidator(_finite)]
Count = Annotated[int, Field(ge=0, le=1 << 62)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1, max_length=1024)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MatrixEntry(_Strict):
    name: Name
    layer: Annotated[int, Field(ge=0, le=MAX_SIDE)]
    module: Name
    shape: Annotated[list[Side], Field(min_length=2, max_length=2)]  # (out, in)


class BaseModelEntry(_Strict):
    source: Name
    sha256: Digest
    model_type: str | None = None
    architecture: str | None = None


class AdapterEntry(_Strict):
    method: Literal[tuple(TRAINING_METHODS)]  # type: ignore[valid-type]
    adapter_method: str
    rank: Side
    alpha: Annotated[Finite, Field(gt=0)]
    config_model: Literal[CONFIG_MODELS]  # type: ignore[valid-type]
    imatrix: bool
    #: trained as Q_c(W + s B M A) (train --merge-aware): exports must be merged, nearest-rounded
    merge_aware: bool = False


class SearchEntry(_Strict):
    mode: str = "ladder"


class TrainingEntry(_Strict):
    """What a run recorded; the figures commands print are typed, the rest (settings,
    history, data) kept as written."""

    model_config = ConfigDict(strict=True, extra="allow")

    search: SearchEntry = SearchEntry()
    settings: dict[str, Any] = {}
    configs: Count | None = None  # the final training set's size
    evaluated: Count | None = None  # configurations measured
    processes: Count = 1
    seconds: Finite | None = None
    wall_seconds: Finite | None = None
    search_seconds: Finite | None = None
    search_share: Finite | None = None


class Manifest(_Strict):
    """manifest.json, typed: what every command reads of a bundle (bundle/store.py writes it)."""

    format: str
    format_version: int
    base_model: BaseModelEntry
    scheme: str
    choices: Annotated[list[Name], Field(min_length=1, max_length=MAX_ITEMS)]
    matrices: Annotated[list[MatrixEntry], Field(min_length=1, max_length=MAX_ITEMS)]
    adapter: AdapterEntry
    training: TrainingEntry
    files: dict[str, Digest]


class Listing(_Strict):
    """configs.json: formats per configuration, in the manifest's matrix order."""

    matrices: list[str]
    training_set: Annotated[list[list[str]], Field(min_length=1, max_length=MAX_ITEMS)]
    evaluated: Annotated[list[list[str]], Field(max_length=MAX_ITEMS)] | None = None


class Score(_Strict):
    # not necessarily finite: a diverged run measures NaN, a hopeless configuration inf
    loss: float
    perplexity: float
    tokens: Count


class Evaluation(Score):
    config: Count | dict[str, str]
    bytes: Count
    bits_per_weight: Finite
    step: Count
    front: bool | None = None


class Hypervolume(_Strict):
    value: float
    lo: list[float]
    hi: list[float]
    reference_point: list[float]


class SearchRound(_Strict):
    step: Count
    measured: Count
    proposed: Count
    training_set: Count
    hypervolume: float
    seconds: Finite


class SearchRecord(_Strict):
    rounds: list[SearchRound] = []


class Pareto(_Strict):
    """pareto.json: every configuration measured, with its validation loss."""

    evaluations: Annotated[list[Evaluation], Field(min_length=1, max_length=MAX_ITEMS)]
    unquantized: Score | None = None
    hypervolume: Hypervolume | None = None
    search: SearchRecord = SearchRecord()


class SensitivityFile(_Strict):
    """sensitivity.json: the cost of each (matrix, format); null where a format cannot store it."""

    kind: str
    matrices: list[str]
    choices: list[str]
    cost: list[list[Annotated[Finite, Field(ge=0)] | None]]


def _parse(model: type[_Strict], raw: Any, where: str) -> _Strict:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(map(str, first["loc"])) or "the top level"
        problem = re.sub(r" or instance of \w+$", "", first["msg"]).lower()  # pydantic's class names mean nothing here
        raise _fail(where, f"{field}: {problem}") from None


def _fail(where: str, problem: str) -> BundleError:
    return BundleError(f"{where}: {problem}; the bundle was edited or damaged, retrain it or restore it from a copy")


def check_manifest(raw: Any, where: str) -> Manifest:
    manifest = _parse(Manifest, raw, where)
    if not _distinct([m.name for m in manifest.matrices]):
        raise _fail(where, "a matrix is listed twice")
    try:
        scheme = get_scheme(manifest.scheme)
    except SchemeError as e:
        raise _fail(where, str(e).partition(";")[0]) from None
    for choice in manifest.choices:
        try:
            scheme.format(choice)
        except SchemeError:
            raise _fail(where, f"{choice!r} is not a {manifest.scheme} format") from None
    adapter = manifest.adapter
    if adapter.rank > min(min(m.shape) for m in manifest.matrices):
        raise _fail(where, f"LoRA rank {adapter.rank} is larger than an adapted matrix")
    if adapter.adapter_method != TRAINING_METHODS[adapter.method]:
        raise _fail(where, f"method {adapter.method} does not build a {adapter.adapter_method} adapter")
    if adapter.merge_aware and adapter.method == "none":
        raise _fail(where, "method none has no LoRA to have trained merge-aware")
    return manifest


def check_listing(raw: Any, manifest: Manifest, where: str) -> int:
    """Validate configs.json; returns how many configurations were evaluated."""
    listing = _parse(Listing, raw, where)
    names = [m.name for m in manifest.matrices]
    if listing.matrices != names:
        raise _fail(where, "its matrices differ from the manifest's")
    evaluated = listing.evaluated if listing.evaluated is not None else listing.training_set
    if evaluated[: len(listing.training_set)] != listing.training_set:
        raise _fail(where, "the evaluated configurations do not begin with the training set")
    choices = set(manifest.choices)
    for row in listing.training_set + evaluated:
        if len(row) != len(names) or not set(row) <= choices:
            raise _fail(where, f"a configuration does not give one of the bundle's {len(choices)} formats "
                               f"to each of its {len(names)} matrices")
    return len(evaluated)


def check_pareto(raw: Any, evaluated: int, manifest: Manifest, where: str) -> None:
    pareto = _parse(Pareto, raw, where)
    names, choices = {m.name for m in manifest.matrices}, set(manifest.choices)
    for e in pareto.evaluations:
        if isinstance(e.config, int) and e.config >= evaluated:
            raise _fail(where, f"an evaluation names configuration {e.config} of {evaluated}")
        if isinstance(e.config, dict) and (e.config.keys() != names or not set(e.config.values()) <= choices):
            raise _fail(where, "an evaluation's configuration does not match the bundle's matrices and formats")


def check_sensitivity(raw: Any, manifest: Manifest, where: str) -> None:
    s = _parse(SensitivityFile, raw, where)
    if not _distinct(s.matrices) or set(s.matrices) != {m.name for m in manifest.matrices}:
        raise _fail(where, "its matrices differ from the manifest's")
    if not _distinct(s.choices) or not set(s.choices) <= set(manifest.choices):
        raise _fail(where, "its formats are not the bundle's")
    if len(s.cost) != len(s.matrices) or any(len(row) != len(s.choices) for row in s.cost):
        raise _fail(where, "its cost table is not one row per matrix and one column per format")


def _distinct(items: list[str]) -> bool:
    return len(set(items)) == len(items)


def check_safetensors(path: Path) -> None:
    """Open ``path`` to its header: tensor names, dtypes, shapes and offsets that cover the file."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(str(path), f"not a readable safetensors file ({reason})") from None


def check_imatrix(values: Mapping[str, Any], manifest: Manifest, where: str) -> None:
    """An importance matrix reaches ggml's quantizer, which trusts its length: one finite,
    non-negative float32 weight per input column of each adapted matrix, nothing else."""
    import torch

    columns = {m.name: m.shape[1] for m in manifest.matrices}
    for name, tensor in values.items():
        ok = (name in columns and tensor.dtype == torch.float32 and tuple(tensor.shape) == (columns[name],)
              and bool(torch.isfinite(tensor).all()) and bool((tensor >= 0).all()))
        if not ok:
            raise _fail(where, f"{name!r} is not a float32 importance vector of an adapted matrix's input width")
