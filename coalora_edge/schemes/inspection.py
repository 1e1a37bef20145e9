"""What `coalora-edge inspect` reports: the model's adaptable matrices and their formats."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from coalora_edge.errors import SchemeError
from coalora_edge.model.matrices import Matrix, find_matrices
from coalora_edge.schemes.base import Scheme


def format_options(scheme: Scheme, choices: Sequence[str], matrix: Matrix) -> list[dict[str, Any]]:
    """Each choice for one matrix: what actually stores it (fallback), bits per weight, bytes."""
    options = []
    for choice in choices:
        try:
            fmt = scheme.storage(choice, matrix.shape)
        except SchemeError:
            continue
        options.append(
            {
                "choice": choice,
                "stored_as": fmt.name,
                "bits_per_weight": round(fmt.bits_per_weight(matrix.shape), 6),
                "bytes": fmt.nbytes(matrix.shape),
            }
        )
    if not options:
        raise SchemeError(
            f"no {scheme.name} format in {list(choices)} can hold {matrix.name} "
            f"({matrix.shape[0]}x{matrix.shape[1]}); add a format with a smaller block"
        )
    return options


def inspect_model(model: nn.Module, scheme: Scheme, choices: Sequence[str]) -> dict[str, Any]:
    """A JSON-ready description of ``model`` under ``scheme`` restricted to ``choices``."""
    matrices = find_matrices(model)
    rows = []
    for m in matrices:
        options = format_options(scheme, choices, m)
        rows.append({"name": m.name, "layer": m.layer, "module": m.module, "shape": list(m.shape), "formats": options})
    adapted = sum(m.numel for m in matrices)
    smallest = sum(min(o["bytes"] for o in r["formats"]) for r in rows)
    largest = sum(max(o["bytes"] for o in r["formats"]) for r in rows)
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": len({m.layer for m in matrices}),
        "adapted_parameters": adapted,
        "scheme": scheme.name,
        "choices": list(choices),
        "matrices": rows,
        "fallbacks": sorted({(o["choice"], o["stored_as"]) for r in rows for o in r["formats"] if o["choice"] != o["stored_as"]}),
        "smallest_config_bytes": smallest,
        "largest_config_bytes": largest,
        "smallest_bits_per_weight": round(8 * smallest / adapted, 6),
        "largest_bits_per_weight": round(8 * largest / adapted, 6),
    }
