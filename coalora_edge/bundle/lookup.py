"""Configurations of a bundle by what users name them: the best measured one under a size
(``--bpw``), or a JSON file (``--config``); and the measurements they are chosen from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from coalora_edge.bundle.store import PARETO, Bundle
from coalora_edge.errors import SchemeError
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import Configuration


def final_evaluations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of pareto.json measured with the final adapter (earlier rounds' are stale)."""
    last = max(e["step"] for e in records)
    return [e for e in records if e["step"] == last]


def evaluations(bundle: Bundle) -> list[dict[str, Any]]:
    """The bundle's measurements with the final adapter."""
    return final_evaluations(bundle.read_json(PARETO)["evaluations"])


def config_at_bpw(bundle: Bundle, bits_per_weight: float) -> tuple[Configuration, dict[str, Any]]:
    """The known configuration with the lowest validation loss at or under the budget."""
    known = bundle.evaluated()
    fitting = [e for e in evaluations(bundle) if e["bits_per_weight"] <= bits_per_weight + 1e-12]
    if not fitting:
        smallest = min(e["bits_per_weight"] for e in evaluations(bundle))
        raise SchemeError(
            f"no known configuration fits {bits_per_weight} bits per weight (the smallest is {smallest:.4f}); "
            "raise --bpw"
        )
    best = min(fitting, key=lambda e: e["loss"])
    return known[best["config"]], best


def read_config_file(bundle: Bundle, path: Path) -> Configuration:
    """A configuration from JSON: ``{matrix: format}`` or a list of formats in matrix order."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemeError(f"cannot read configuration file {path}: {e}") from None
    names = [m.name for m in bundle.matrices]
    if isinstance(raw, list):
        if len(raw) != len(names):
            raise SchemeError(f"{path} lists {len(raw)} formats; the bundle adapts {len(names)} matrices")
        raw = dict(zip(names, raw))
    if not isinstance(raw, Mapping) or set(raw) != set(names) or not all(isinstance(v, str) for v in raw.values()):
        raise SchemeError(f"{path} must map each of the bundle's {len(names)} matrices to a format name")
    scheme = get_scheme(bundle.scheme)
    for m in bundle.matrices:
        scheme.storage(raw[m.name], m.shape)  # unknown format or a shape it cannot hold: raises
    return dict(raw)

