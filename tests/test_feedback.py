"""Rounding with error feedback (schemes/feedback.py) through ggml's own quantizer: the bytes
are valid ggml blocks, and on correlated inputs they reproduce a layer's outputs better
than nearest rounding; with uncorrelated inputs there is nothing to feed forward."""

import numpy as np
import pytest
import torch

from coalora_edge.schemes import onnx as onnx_scheme
from coalora_edge.schemes.feedback import feedback_round, inverse_cholesky
from coalora_edge.schemes.gguf import FORMATS

OUT, IN = 64, 512
TYPES = ("Q4_0", "Q5_1", "IQ4_NL", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS")


def correlated_inputs(tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated columns and uneven scales, as real layers see."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g) / IN**0.5 + torch.eye(IN)
    scales = torch.rand(IN, generator=g) * 3 + 0.2
    return (torch.randn(tokens, IN, generator=g) @ mixing) * scales  # (tokens, in)


def ggml_group(fmt, imatrix):
    def quantize_group(columns, first):
        blocks = fmt.quantize(columns, None if imatrix is None else imatrix[first: first + columns.shape[1]])
        return blocks, fmt.dequantize(blocks, columns.shape[1])

    return quantize_group


def output_error(weight, values, hessian) -> float:
    e = (weight - values).double()
    return float(torch.einsum("oi,ij,oj->", e, hessian.double(), e))


@pytest.fixture(scope="module")
def layer():
    x = correlated_inputs()
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / x.shape[0]
    return weight, hessian, hessian.diagonal().float().contiguous()


@pytest.mark.parametrize("type_name", TYPES)
def test_feedback_bytes_decode_and_beat_nearest_rounding(layer, type_name):
    weight, hessian, imatrix = layer
    fmt = FORMATS[type_name]
    imatrix = imatrix if fmt.uses_imatrix else None
    parts = feedback_round(weight, hessian, fmt.block, ggml_group(fmt, imatrix))
    blocks = np.concatenate(parts, axis=1)  # (out, row bytes): whole ggml rows
    assert blocks.shape == (OUT, fmt.nbytes((OUT, IN)) // OUT)
    values = fmt.dequantize(blocks, IN)  # ggml's own to_float over the whole rows
    groups = torch.cat([fmt.dequantize(p, p.shape[1] * fmt.block // fmt.type_size) for p in parts], dim=1)
    assert torch.equal(values, groups)
    nearest = fmt.roundtrip(weight, imatrix)
    # measured 0.58-0.59 for 32-weight blocks (16 groups per row), 0.79-0.81 for 256 (2 groups)
    assert output_error(weight, values, hessian) < (0.7 if fmt.block == 32 else 0.9) * output_error(weight, nearest, hessian)


def test_uncorrelated_inputs_leave_nothing_to_feed_forward(layer):
    weight, _, _ = layer
    diagonal = torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(2)) + 0.5)
    fmt = FORMATS["Q4_0"]
    parts = feedback_round(weight, diagonal, fmt.block, ggml_group(fmt, None))
    assert np.array_equal(np.concatenate(parts, axis=1), fmt.quantize(weight))


def test_inverse_cholesky_of_a_damped_hessian_with_dead_columns(layer):
    _, hessian, _ = layer
    h = hessian.double().clone()
    h[:, :7] = 0
    h[:7, :] = 0  # inputs no token reached
    u = inverse_cholesky(h)
    assert torch.isfinite(u).all() and torch.equal(u, torch.triu(u))
    damped = h.clone()
    damped[range(7), range(7)] = 1.0
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    assert torch.allclose(u.T @ u @ damped, torch.eye(IN, dtype=torch.float64), atol=1e-8)


def test_onnx_rows_that_are_not_a_block_multiple(layer):
    """MatMulNBits pads a row's last block: the last group is the short tail, and the
    joined quantization is what ORT's packing takes."""
    weight, hessian, _ = layer
    n_in = IN - 40
    fmt = onnx_scheme.FORMATS["int4_b32_asym"]

    def quantize_group(columns, first):
        q = onnx_scheme.quantize(columns, fmt)
        return q, onnx_scheme.dequantize(q)

    quant = onnx_scheme.join(feedback_round(weight[:, :n_in], hessian[:n_in, :n_in], fmt.block, quantize_group))
    assert quant.in_features == n_in and quant.codes.shape == (OUT, -(-n_in // 32), 32)
    assert not quant.codes.reshape(OUT, -1)[:, n_in:].any()  # ORT writes no codes for padding
    onnx_scheme.pack(quant)
    nearest = onnx_scheme.dequantize(onnx_scheme.quantize(weight[:, :n_in], fmt))
    h = hessian[:n_in, :n_in]
    assert output_error(weight[:, :n_in], onnx_scheme.dequantize(quant), h) < 0.7 * output_error(weight[:, :n_in], nearest, h)
