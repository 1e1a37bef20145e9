"""Rounding with error feedback: a matrix's stored codes chosen for the layer's outputs,
not weight by weight (GPTQ, Frantar et al. 2023, at the granularity of a format's blocks).

Plain quantization rounds each block of ``W [out, in]`` to its nearest codes, which
minimises the weight error. What a layer computes with is ``W x``: minimising the output
error ``E ||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T)`` with ``H = E[x x^T]`` instead lets
the error of one block of columns be compensated in the columns after it:

    for each block S of ``group`` columns, left to right:
        Q_S   = the format's own quantizer applied to the current W_S
        W_R  -= (W_S - Q_S) U_SS^-1 U_SR          (R: the columns after S)

where ``U`` is the upper Cholesky factor of ``H^-1`` (the optimal update of the remaining
columns for a fixed error on S; OBQ's rule solved for a block at once). The codes of each
block are still chosen by the format's quantizer (ggml's, for GGUF), so the stored bytes
are valid by construction and decode with the runtime's own dequantizer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: Added to H's diagonal, as a fraction of its mean, so that H^-1 exists (GPTQ's default).
DAMPING = 0.01

#: ``quantize_group(columns [out, group] fp32, first column) -> (stored, dequantized [out, group])``
GroupQuantizer = Callable[[torch.Tensor, int], tuple[Any, torch.Tensor]]


def inverse_cholesky(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = (H + damping * mean(diag H) I)^-1``, fp64 ``[in, in]``."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # columns no calibration token reached: any code is as good
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def feedback_round(weight: torch.Tensor, hessian: torch.Tensor, group: int,
                   quantize_group: GroupQuantizer) -> list[Any]:
    """The stored form of each block of ``group`` columns of ``weight [out, in]``, left to
    right, each chosen after the errors of the blocks before it were fed forward. The last
    block is shorter when rows are not a multiple (formats that pad rows, like ONNX's)."""
    out, n_in = weight.shape
    w = weight.detach().double().clone()  # (out, in), updated as blocks are fixed
    u = inverse_cholesky(hessian)  # (in, in)
    parts = []
    for first in range(0, n_in, group):
        s, rest = slice(first, first + group), slice(first + group, n_in)
        stored, values = quantize_group(w[:, s].float().contiguous(), first)  # (out, group)
        error = torch.linalg.solve_triangular(u[s, s], w[:, s] - values.double(), upper=True, left=False)
        w[:, rest] -= error @ u[s, rest]
        parts.append(stored)
    return parts
