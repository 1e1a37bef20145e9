"""Merged artifacts that keep what the adapter learned: merge-aware rounding at export.

A merged file stores one quantized matrix per adapted layer. Re-quantizing the merged
weight ``W + s B'A`` to its nearest codes (``nearest``) rounds most of a small adapter
update away at low bits. ``feedback`` (on request) rounds the same merged weight for the layer's
*outputs* on calibration text instead (GPTQ, schemes/feedback.py): the error of each
block of columns is compensated in the columns after it, weighted by the second moments
``H = E[x x^T]`` of the layer's input, collected from the trained model itself at the
exported configuration (adapters on), so the errors are weighed where the trained model
sends its activations. For ``--method none`` this is GPTQ of the base weight.

Why the merged weight and not the trained one, ``Q_c(W) + s B'A``: rounding a weight that
already sits near the grid snaps it back to ``Q_c(W)``'s codes wherever the update is
under half a step, and a block of columns that is a whole row has no later columns to
take its error. Measured (BENCHMARKS.md, issue 14): on TinyStories-656K in ONNX Runtime
at 3 bits per weight, perplexity 225 rounding the trained weight, 106 rounding the merged
one, 117 nearest rounding, 72.5 the trained model.

A bundle trained ``--merge-aware`` needs neither: its layers computed ``Q_c(W + s B'A)``
itself, through the same ``fold`` (adapter/layer.py) and quantizer, so nearest rounding
stores exactly the trained weights, and sidecar or feedback rounding would not (refused).

Calibration text is the training data the manifest names (or ``calibration``), cut into
blocks of the training sequence length. Second moments of shared inputs (q/k/v, gate/up)
are collected once; matrices go in chunks whose moments fit ``HESSIAN_BUDGET``, one pass
over the calibration blocks per chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from coalora_edge.adapter.layer import fold
from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import CoaloraError, DataError
from coalora_edge.exporters.common.calibration import text_blocks
from coalora_edge.schemes.base import Format
from coalora_edge.schemes.feedback import GroupQuantizer, feedback_round
from coalora_edge.schemes.quantize import Configuration

ROUNDINGS = ("nearest", "feedback")
#: calibration blocks (of the training sequence length) the second moments are taken over
CALIBRATION_BLOCKS = 32
#: fp32 bytes of second-moment matrices held at once; more matrices take more passes
HESSIAN_BUDGET = 1 << 30
BATCH = 4


def checked_rounding(restored: Restored, adapter_mode: str, rounding: str | None, calibration: Path | None) -> str:
    """The rounding asked for; by default nearest, or feedback when calibration text is given.

    Not feedback by default: on SmolLM2-135M it lowers the KL from F16 on text like the
    calibration text but raises it on text of another domain (BENCHMARKS.md, issue 14)."""
    if rounding is None:
        rounding = "feedback" if calibration is not None else "nearest"
    if calibration is not None and rounding != "feedback":
        raise CoaloraError(f"--calibration is text for feedback rounding, and this export rounds {rounding}; "
                           "add --rounding feedback or drop --calibration")
    if rounding not in ROUNDINGS:
        raise CoaloraError(f"unknown rounding {rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
    if rounding == "feedback" and adapter_mode != "merged":
        raise CoaloraError("feedback rounding applies to merged exports (sidecar ships the trained bytes); "
                           "drop --rounding or use --adapter-mode merged")
    check_merge_aware(restored, adapter_mode, rounding)
    return rounding


def check_merge_aware(restored: Restored, adapter_mode: str, rounding: str) -> None:
    """A merge-aware bundle was trained as its nearest-rounded merged file: anything else
    ships other weights than the trained ones."""
    if not restored.wrapper.merge_aware:
        return
    if adapter_mode != "merged":
        raise CoaloraError(f"this bundle was trained merge-aware: only a merged file holds what it learned, and "
                           f"--adapter-mode {adapter_mode} would ship Q(W) + LoRA; export with --adapter-mode merged")
    if rounding != "nearest":
        raise CoaloraError(f"this bundle was trained merge-aware, for nearest rounding of the merged weight; "
                           f"{rounding} rounding would change the trained weights: drop --rounding/--calibration")


def calibration_blocks(restored: Restored, calibration: Path | None = None,
                       blocks: int = CALIBRATION_BLOCKS) -> torch.Tensor:
    """Token blocks ``(n, seq_len)`` of the calibration text: ``calibration`` or the training data."""
    try:
        found = text_blocks(restored, calibration, blocks)
    except DataError as e:
        raise DataError(f"feedback rounding needs calibration text: {e}; pass --calibration FILE or "
                        "--rounding nearest") from None
    if found is None:
        raise CoaloraError("feedback rounding needs calibration text and the training data the bundle names is "
                           "not readable here; pass --calibration FILE or --rounding nearest")
    return found


def targets(restored: Restored, config: Configuration) -> dict[str, torch.Tensor]:
    """The merged weight ``W + s B'A`` of each adapted matrix (``W`` for method none), fp32 ``[out, in]``."""
    wrapper = restored.wrapper
    weights = {name: layer.base_layer.weight.detach().float() for name, layer in wrapper.layers.items()}
    if wrapper.method == "none":
        return weights
    lora = wrapper.collapsed_lora(config)
    return {name: fold(w, *lora[name], wrapper.scaling) for name, w in weights.items()}


def second_moments(restored: Restored, names: Sequence[str], blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` fp32 ``[in, in]`` of each named adapted layer's input, from the trained
    model at its current configuration. Layers fed the same tensor share one matrix."""
    wrapper = restored.wrapper
    sums: dict[str, torch.Tensor] = {}
    first_reader: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, layer): kept alive per batch
    shared: dict[str, str] = {}

    def hook(name: str):
        def accumulate(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            seen = first_reader.setdefault(id(x), (x, name))
            if seen[1] != name:
                shared[name] = seen[1]
                return
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x

        return accumulate

    handles = [wrapper.layers[n].register_forward_pre_hook(hook(n)) for n in names]
    device = next(wrapper.model.parameters()).device
    try:
        with torch.no_grad():
            for batch in blocks.split(BATCH):
                wrapper(input_ids=batch.to(device))
                first_reader.clear()
    finally:
        for h in handles:
            h.remove()
    tokens = blocks.numel()
    moments = {n: s / tokens for n, s in sums.items()}
    return moments | {n: moments[owner] for n, owner in shared.items()}


def chunks(restored: Restored, budget: int = HESSIAN_BUDGET) -> Iterator[list[str]]:
    """Matrix names in order, grouped so that one group's second moments fit ``budget``."""
    group, held = [], 0
    for m in restored.wrapper.matrices:
        size = 4 * m.shape[1] ** 2
        if group and held + size > budget:
            yield group
            group, held = [], 0
        group.append(m.name)
        held += size
    if group:
        yield group


def feedback_rounded(restored: Restored, config: Configuration, formats: dict[str, Format],
                     quantizers: dict[str, GroupQuantizer], blocks: torch.Tensor) -> dict[str, list]:
    """Matrix name -> the stored parts (one per block of columns) of its feedback rounding."""
    restored.use(config)
    wanted = targets(restored, config)
    parts = {}
    for names in chunks(restored):
        moments = second_moments(restored, names, blocks)
        for name in names:
            parts[name] = feedback_round(wanted[name], moments[name], formats[name].block, quantizers[name])
        del moments
    return parts
