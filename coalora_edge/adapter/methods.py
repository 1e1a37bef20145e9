"""What a run can train, as tables: the adapter a :class:`CoALoRAModel` builds, and the
training methods the trainer compares, each with the adapter it trains."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterKind:
    lora: bool  # trains LoRA factors A and B
    config_aware: bool  # multiplies B by M from the configuration model (else M = I)


#: adapter name -> what it trains (the bundle's ``adapter_method``)
ADAPTERS: dict[str, AdapterKind] = {
    "coa": AdapterKind(lora=True, config_aware=True),
    "shared": AdapterKind(lora=True, config_aware=False),
    "none": AdapterKind(lora=False, config_aware=False),
}
#: training method -> the adapter it trains. "per-config" (one ordinary LoRA per
#: configuration) keeps one "shared" state per configuration.
TRAINING_METHODS: dict[str, str] = {"coa": "coa", "per-config": "shared", "shared": "shared", "none": "none"}
