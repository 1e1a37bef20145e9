"""Exact agreement: a runtime that computes the trained model itself (no 8-bit activations,
no re-quantization) must match its logits to float rounding, or the export is a bug."""

from __future__ import annotations

from typing import Any

import torch

from coalora_edge.errors import ExportError
from coalora_edge.exporters.common.report import agreement


def exact_figures(reference: torch.Tensor, got: torch.Tensor, tolerance: float, what: str,
                  against: str = "the trained model") -> dict[str, Any]:
    """Logits ``(positions, V)`` of ``what`` against ``reference`` (``against``, the PyTorch
    model it must compute): agreement figures with the max |difference| absolute and
    relative to the largest logit; raises ExportError past ``tolerance`` (relative)."""
    max_abs_diff = float((reference - got).abs().max())
    relative = max_abs_diff / float(reference.abs().max())
    if not relative <= tolerance:  # also catches NaN
        raise ExportError(f"{what} differs from {against} by {max_abs_diff:.3g} (relative {relative:.3g} > "
                          f"{tolerance:g}): the export does not compute what was trained; report this bug")
    return {**agreement(reference, got).as_dict(), "max_abs_diff": max_abs_diff, "relative": relative,
            "tolerance": tolerance}
