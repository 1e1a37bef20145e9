"""Rebuild the trained model from a bundle, and pick its configurations.

Used by everything after training (eval, resolve, export): the base model is loaded
from where the manifest says (or where the user points), checked against the
fingerprint, wrapped exactly as in training (scheme, matrices, rank, alpha, importance
matrix) and given the trained adapter state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.bundle.store import Bundle
from coalora_edge.errors import SchemeError
from coalora_edge.model.loading import load_model, load_tokenizer, resolve_model_dir
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import Configuration
from coalora_edge.training.trainer import per_config_state


@dataclass
class Restored:
    bundle: Bundle
    wrapper: CoALoRAModel
    tokenizer: Any
    model_dir: Path
    state: dict[str, torch.Tensor]

    def use(self, config: Configuration) -> None:
        """Make ``config`` current, with the adapter trained for it (per-config: its own)."""
        method = self.bundle.manifest.adapter.method
        if method == "per-config":
            trained = self.bundle.configs()
            if dict(config) not in trained:
                raise SchemeError(
                    "a per-config bundle has adapters only for its training configurations; pick one of "
                    f"those ({len(trained)}, see `coalora-edge pareto`) or train with --method coa"
                )
            self.wrapper.load_trainable_state(per_config_state(self.state, trained.index(dict(config))))
        self.wrapper.set_config(config)


def restore(bundle: Bundle, model: str | None = None, device: str = "cpu") -> Restored:
    model_dir = resolve_model_dir(model or bundle.manifest.base_model.source)
    bundle.check_base_model(model_dir)
    base = load_model(str(model_dir), device=device)
    adapter = bundle.manifest.adapter
    imatrix = bundle.imatrix() if adapter.imatrix else None
    wrapper = CoALoRAModel(base, get_scheme(bundle.scheme), rank=adapter.rank, alpha=adapter.alpha,
                           method=adapter.adapter_method, matrices=[m.name for m in bundle.matrices], imatrix=imatrix,
                           config_model=adapter.config_model, choices=bundle.choices,
                           merge_aware=adapter.merge_aware)
    state = bundle.adapter_state()
    if adapter.method != "per-config" and state:
        wrapper.load_trainable_state(state)
    return Restored(bundle, wrapper, load_tokenizer(model_dir, base.config.vocab_size), model_dir, state)
