"""The onnx scheme against ONNX Runtime itself: its quantizer's bytes and its MatMulNBits output."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from coalora_edge.errors import SchemeError
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.onnx import FORMATS, SCHEME, OnnxFormat, pack, quantize, roundf

NAMES = sorted(FORMATS)
# 201: the byte where K ends is half padding and ORT fills that half with stale codes;
# 129: for small blocks that byte opens a fresh MLAS thread block, whose padding stays 0.
IN_FEATURES = (201, 129)


def _tie_rows(fmt: OnnxFormat, k: int) -> list[np.ndarray]:
    """Rows whose blocks get scale 1, so weights land exactly on .5 after scaling.

    Every block starts at a multiple of 16, so pinning positions 16j (and 16j+1) pins
    each block's range for every block size.
    """
    qmax, mid = fmt.qmax, 1 << (fmt.bits - 1)
    j = np.arange(k)
    pinned, second = j % 16 == 0, j % 16 == 1
    halves = (j % qmax) + 0.5
    code_ties = np.where(pinned, qmax, halves)  # asym: range [0, qmax], zp 0
    sym_ties = np.where(pinned, -mid, halves - mid)  # sym: m = -mid, zp mid
    zp_ties = np.where(pinned, -1.5, np.where(second, qmax - 1.5, halves - 1.5))  # zp 1.5 -> 2
    equal_ends = np.where(pinned, -2.0, np.where(second, 2.0, halves / qmax))  # |max| == |min|
    return [code_ties, sym_ties, zp_ties, equal_ends]


def _near_tie_row(fmt: OnnxFormat, k: int) -> np.ndarray:
    """Weights a few ulps around each rounding boundary of the block's scale.

    Multiplying by the reciprocal instead of dividing, or fusing the multiply-add, moves
    some of these across the boundary.
    """
    j = np.arange(k)
    row = np.where(j % 16 == 0, -0.7, np.where(j % 16 == 1, 0.3, 0.0)).astype(np.float32)
    quant = quantize(torch.from_numpy(row[None]), fmt)
    scale, zp = quant.scales[0, 0].numpy(), quant.zero_points[0, 0].numpy().astype(np.float32)
    boundaries = ((np.arange(fmt.qmax) + 0.5 - zp) / (np.float32(1) / scale)).astype(np.float32)
    down, up, near = boundaries, boundaries, [boundaries]
    for _ in range(2):
        down, up = np.nextafter(down, np.float32(-1)), np.nextafter(up, np.float32(1))
        near += [down, up]
    candidates = np.concatenate(near)
    candidates = candidates[(candidates > -0.7) & (candidates < 0.3)]
    free = np.flatnonzero(j % 16 > 1)
    row[free] = np.resize(candidates, free.size)
    return row


def _weights(fmt: OnnxFormat, k: int) -> torch.Tensor:
    """W [out, in] with zeros, all-zero blocks, outliers, one-signed rows and crafted ties."""
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.block + k)
    normal = rng.standard_normal((6, k)) * rng.exponential(1.0, (6, 1))
    normal[0, rng.random(k) < 0.3] = 0.0  # scattered exact zeros
    normal[1, : k // 2] = 0.0  # zero blocks in a live row
    normal[2, rng.integers(k)] = 1e4  # an outlier that flattens its block
    rows = [
        np.zeros(k),  # every block all zero: scale 0, reciprocal 0
        np.abs(normal[3]),  # all positive: symmetric scale negative
        -np.abs(normal[4]),  # all negative
        *normal,
        *_tie_rows(fmt, k),
    ]
    weight = np.stack(rows).astype(np.float32)
    return torch.from_numpy(np.vstack([weight, _near_tie_row(fmt, k)]))


@functools.lru_cache(maxsize=None)
def _ort_quantized(name: str, k: int) -> onnx.ModelProto:
    """ORT's quantizer run on a one-MatMul graph whose B is W^T."""
    fmt = FORMATS[name]
    weight_t = _weights(fmt, k).numpy().T.copy()  # (K, N)
    n = weight_t.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "one_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight_t, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(
        model, bits=fmt.bits, block_size=fmt.block, is_symmetric=fmt.symmetric, accuracy_level=0
    )
    quantizer.process()
    return quantizer.model.model


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """MatMulNBits' inputs 1-3 by role."""
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits"
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return dict(zip(("b", "scales", "zero_points"), (arrays[i] for i in node.input[1:])))


def _assert_same_array(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
        f"{what}: ours {ours.dtype}{ours.shape}, ORT {theirs.dtype}{theirs.shape}"
    )
    assert ours.tobytes() == theirs.tobytes(), f"{what}: {np.sum(ours != theirs)} elements differ"


@pytest.mark.parametrize("k", IN_FEATURES)
@pytest.mark.parametrize("name", NAMES)
def test_packed_initializers_match_ort_quantizer(name: str, k: int) -> None:
    fmt = FORMATS[name]
    ours = pack(quantize(_weights(fmt, k), fmt))
    theirs = _initializers(_ort_quantized(name, k))
    _assert_same_array(ours.b, theirs["b"], "B")
    _assert_same_array(ours.scales, theirs["scales"], "scales")
    if fmt.symmetric:
        assert ours.zero_points is None and "zero_points" not in theirs
    else:
        _assert_same_array(ours.zero_points, theirs["zero_points"], "zero_points")


# 0 leaves the attribute out, as ORT's quantizer does; 4 rounds activations to int8 (inexact)
@pytest.mark.parametrize("accuracy_level", (0, 1, 2, 3))
@pytest.mark.parametrize("k", IN_FEATURES)
@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_what_matmulnbits_computes(name: str, k: int, accuracy_level: int) -> None:
    fmt = FORMATS[name]
    model = onnx.ModelProto()
    model.CopyFrom(_ort_quantized(name, k))
    if accuracy_level:
        level = helper.make_attribute("accuracy_level", accuracy_level)
        model.graph.node[0].attribute.append(level)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=cpu)
    # identity rows make each output row one row of the weights ORT dequantized
    (dequantized_t,) = session.run(None, {"A": np.eye(k, dtype=np.float32)})  # (K, N)
    ours = fmt.roundtrip(_weights(fmt, k))  # (N, K)
    assert ours.dtype == torch.float32
    differ = np.sum(ours.numpy().T != dequantized_t)
    assert np.array_equal(ours.numpy().T, dequantized_t), f"{differ} weights differ"


@pytest.mark.parametrize("k", IN_FEATURES)
@pytest.mark.parametrize("name", NAMES)
def test_nbytes_is_what_ort_stores(name: str, k: int) -> None:
    fmt = FORMATS[name]
    stored = sum(a.nbytes for a in _initializers(_ort_quantized(name, k)).values())
    assert fmt.nbytes((len(_weights(fmt, k)), k)) == stored


@pytest.mark.parametrize("name", NAMES)
def test_nominal_bits_for_whole_blocks(name: str) -> None:
    fmt = FORMATS[name]
    shape = (3, 8 * fmt.block)  # 8 blocks: zero points fill whole bytes at any bit width
    assert fmt.bits_per_weight(shape) == fmt.nominal_bits_per_weight


def test_roundf_is_c_roundf() -> None:
    crafted = [0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 1.4999999, 2**23 + 1.0, -0.0]
    spread = np.random.default_rng(0).uniform(-300, 300, 2000)
    values = np.concatenate([crafted, spread]).astype(np.float32)
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.roundf.restype, libm.roundf.argtypes = ctypes.c_float, [ctypes.c_float]
    expected = np.array([libm.roundf(float(v)) for v in values], np.float32)
    assert torch.equal(roundf(torch.from_numpy(values)), torch.from_numpy(expected))
    # the cases that break torch.round and floor(x + 0.5)
    breakers = torch.tensor([0.5, 1.5, 2.5, -2.5, 0.49999997])
    assert roundf(breakers).tolist() == [1.0, 2.0, 3.0, -3.0, 0.0]


def test_scheme_table() -> None:
    assert get_scheme("onnx") is SCHEME
    assert len(SCHEME.formats) == 30
    assert len(SCHEME.default_choices) == 12
    defaults = [SCHEME.format(n) for n in SCHEME.default_choices]
    grid = {(bits, block) for bits in (2, 4, 8) for block in (32, 64, 128, 256)}
    assert {(f.bits, f.block) for f in defaults} == grid
    assert not any(f.symmetric for f in defaults)
    fmt = SCHEME.format("int4_b32_asym")
    assert (fmt.bits, fmt.block, fmt.symmetric) == (4, 32, False)
    assert fmt.fields == {"bits": 4, "block": 32, "symmetric": False}
    assert SCHEME.storage("int8_b256_sym", (5, 201)) is SCHEME.format("int8_b256_sym")


def test_roundtrip_refuses_imatrix() -> None:
    with pytest.raises(SchemeError, match="importance matrix"):
        FORMATS["int4_b32_asym"].roundtrip(torch.ones(2, 32), imatrix=torch.ones(32))
