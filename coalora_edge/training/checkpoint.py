"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

    CHECKPOINT_DIR/
      adapter.safetensors    trainable state (LoRA factors, configuration model)
      optimizer.safetensors  AdamW moments and step counts, keyed "{param index}.{name}"
      state.json             step, configuration set, settings, optimizer param groups

No random-generator state is needed: the trainer derives every batch and every sampled
configuration from (seed, step). A checkpoint is written to a temporary folder and
renamed over the previous one, so a run killed at any moment leaves the last complete
checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coalora_edge.errors import CoaloraError
from coalora_edge.fileio import atomic_dir

STATE = "state.json"


@dataclass
class Checkpoint:
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    state: dict[str, Any]  # run, step, configs, settings, history: JSON-ready


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {f"{pid}.{key}": value for pid, entry in sd["state"].items() for key, value in entry.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    # JSON has no tuples; AdamW checks betas by unpacking, but keep the original type.
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors, groups = _optimizer_tensors(ckpt.optimizer)
    with atomic_dir(path, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.adapter.items()}, tmp / "adapter.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
        (tmp / STATE).write_text(json.dumps(ckpt.state | {"optimizer_param_groups": groups}, indent=2))


def load_checkpoint(path: Path) -> Checkpoint:
    if not (path / STATE).is_file():
        raise CoaloraError(f"no checkpoint in {path} to resume from; run without --resume to start afresh")
    try:
        state = json.loads((path / STATE).read_text())
        adapter = load_file(path / "adapter.safetensors")
        optimizer = _optimizer_state(load_file(path / "optimizer.safetensors"), state.pop("optimizer_param_groups"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise CoaloraError(f"checkpoint {path} is damaged ({type(e).__name__}); delete it and train again "
                           "without --resume") from None
    return Checkpoint(adapter, optimizer, state)
