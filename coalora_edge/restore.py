"""Rebuild the trained model from a bundle, and pick its configurations.

Used by everything after training (eval, resolve, export): the base model is loaded
from where the manifest says (or where the user points), checked against the
fingerprint, wrapped exactly as in training (scheme, matrices, rank, alpha, importance
matrix) and given the trained adapter state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from coalora_edge.adapter import CoALoRAModel
from coalora_edge.bundle import PARETO, Bundle
from coalora_edge.errors import SchemeError
from coalora_edge.models import load_model, load_tokenizer, resolve_model_dir
from coalora_edge.quantize import Configuration
from coalora_edge.schemes import get_scheme


@dataclass
class Restored:
    bundle: Bundle
    wrapper: CoALoRAModel
    tokenizer: Any
    model_dir: Path
    state: dict[str, torch.Tensor]

    def use(self, config: Configuration) -> None:
        """Make ``config`` current, with the adapter trained for it (per-config: its own)."""
        method = self.bundle.manifest["adapter"]["method"]
        if method == "per-config":
            trained = self.bundle.configs()
            if dict(config) not in trained:
                raise SchemeError(
                    "a per-config bundle has adapters only for its training configurations; pick one of "
                    f"those ({len(trained)}, see `coalora-edge pareto`) or train with --method coa"
                )
            prefix = f"cfg{trained.index(dict(config))}."
            self.wrapper.load_trainable_state({k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)})
        self.wrapper.set_config(config)


def restore(bundle: Bundle, model: str | None = None, device: str = "cpu") -> Restored:
    model_dir = resolve_model_dir(model or bundle.manifest["base_model"]["source"])
    bundle.check_base_model(model_dir)
    base = load_model(str(model_dir), device=device)
    adapter = bundle.manifest["adapter"]
    imatrix = bundle.imatrix() if adapter["imatrix"] else None
    wrapper = CoALoRAModel(base, get_scheme(bundle.scheme), rank=adapter["rank"], alpha=adapter["alpha"],
                           method=adapter["adapter_method"], matrices=[m.name for m in bundle.matrices], imatrix=imatrix,
                           config_model=adapter["config_model"], choices=bundle.choices)
    state = bundle.adapter_state()
    if adapter["method"] != "per-config" and state:
        wrapper.load_trainable_state(state)
    return Restored(bundle, wrapper, load_tokenizer(model_dir, base.config.vocab_size), model_dir, state)


def evaluations(bundle: Bundle) -> list[dict[str, Any]]:
    """The measurements taken with the final adapter (earlier search rounds' are stale)."""
    every = bundle.read_json(PARETO)["evaluations"]
    last = max(e["step"] for e in every)
    return [e for e in every if e["step"] == last]


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

