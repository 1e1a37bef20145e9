"""ONNX Runtime's MatMulNBits formats: blockwise round-to-nearest with 2, 4 or 8 bits.

The math is ORT's own RTN quantizer (``MatMulNBitsQuantizer`` with its default algorithm,
MLAS ``BlockwiseQuantizer``), checked byte for byte against onnxruntime 1.32:

* MatMul's B is ``[K, N] = W^T``: each of the N output columns is cut along K into blocks;
  K is zero-padded to a block multiple (``pads_rows``), so no shape is ever refused.
* All in fp32. Asymmetric: ``mn = min(blk, 0)``, ``mx = max(blk, 0)``,
  ``scale = (mx - mn) / qmax``, ``zp = roundf(-mn / scale)`` clamped to ``[0, qmax]``.
  Symmetric: ``m`` = whichever of max/min has the larger magnitude (min on a tie),
  ``scale = -m / 2^(bits-1)`` (negative when ``m`` is positive), ``zp = 2^(bits-1)``.
* Codes: ``clamp(roundf(w * (1 / scale) + zp), 0, qmax)`` with a rounded fp32 reciprocal
  (0 when the scale is 0), a rounded product and then a rounded sum (no fused multiply-add).
* The runtime dequantizes ``(q - zp) * scale`` exactly at accuracy levels 0-3 (level 4
  rounds activations to int8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coalora_edge.errors import SchemeError
from coalora_edge.schemes.base import Format, Scheme, Shape

BITS = (2, 4, 8)
BLOCKS = (16, 32, 64, 128, 256)
#: The search explores asymmetric formats from block 32 up; the others are selectable.
DEFAULT_BLOCKS = (32, 64, 128, 256)
SCALE_BYTES = 4  # scales have the input's dtype, and our models are exported in fp32


@dataclass(frozen=True, repr=False)
class OnnxFormat(Format):
    bits: int
    block: int
    symmetric: bool

    pads_rows = True

    @property
    def name(self) -> str:
        return f"int{self.bits}_b{self.block}_{'sym' if self.symmetric else 'asym'}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        """How many codes (or zero points) one byte holds, low bits first."""
        return 8 // self.bits

    @property
    def nominal_bits_per_weight(self) -> float:
        zero_point_bits = 0 if self.symmetric else self.bits
        return self.bits + (8 * SCALE_BYTES + zero_point_bits) / self.block

    @property
    def fields(self) -> dict[str, Any]:
        return {"bits": self.bits, "block": self.block, "symmetric": self.symmetric}

    def n_blocks(self, in_features: int) -> int:
        return -(-in_features // self.block)

    def nbytes(self, shape: Shape) -> int:
        out_features, in_features = shape
        n_blocks = self.n_blocks(in_features)
        codes = n_blocks * self.block // self.per_byte
        scales = n_blocks * SCALE_BYTES
        zero_points = 0 if self.symmetric else -(-n_blocks // self.per_byte)
        return out_features * (codes + scales + zero_points)

    def roundtrip(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        if imatrix is not None:
            raise SchemeError(
                f"onnx format {self.name} takes no importance matrix (ORT's RTN quantizer has "
                "none); drop the imatrix, or use a gguf scheme that uses one"
            )
        return dequantize(quantize(weight, self))


@dataclass(frozen=True)
class BlockQuant:
    """One matrix quantized for MatMulNBits, codes still unpacked."""

    fmt: OnnxFormat
    in_features: int  # K before padding
    codes: torch.Tensor  # uint8 (N, n_blocks, block); 0 past in_features
    scales: torch.Tensor  # fp32 (N, n_blocks)
    zero_points: torch.Tensor  # uint8 (N, n_blocks); 2^(bits-1) when symmetric


@dataclass(frozen=True)
class MatMulNBitsInitializers:
    """What ORT's quantizer writes as MatMulNBits inputs 1-3 (zero_points: asymmetric only)."""

    b: np.ndarray  # uint8 (N, n_blocks, block * bits / 8)
    scales: np.ndarray  # fp32 (N, n_blocks)
    zero_points: np.ndarray | None  # uint8 (N, ceil(n_blocks * bits / 8))


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero.

    torch.round sends halves to even, and floor(x + 0.5) turns 0.49999997 into 1 because
    the sum rounds up; the fractional part ``x - trunc(x)`` is exact, so compare that.
    """
    whole = torch.trunc(x)
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5)


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``[out, in]`` -> fp32 ``(out, n_blocks, block)``, the tail zero-padded like ORT's."""
    if weight.dim() != 2:
        raise SchemeError(
            f"onnx formats quantize 2-D weights [out, in], got shape {tuple(weight.shape)}; "
            "reshape the weight to a matrix first"
        )
    w = weight.detach().to(torch.float32)
    pad = -w.shape[1] % block
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, block)


def _asymmetric_params(blocks: torch.Tensor, fmt: OnnxFormat) -> tuple[torch.Tensor, torch.Tensor]:
    # padding zeros cannot move the range: it is widened to hold 0 anyway
    mn = blocks.amin(dim=-1).clamp(max=0.0)  # (N, n_blocks)
    mx = blocks.amax(dim=-1).clamp(min=0.0)
    scale = (mx - mn) / fmt.qmax
    # scale 0 means mn == 0, so the guarded division leaves zp = roundf(0) = 0
    zp = roundf(-mn / torch.where(scale == 0, 1.0, scale)).clamp(0, fmt.qmax)
    return scale, zp


def _symmetric_params(blocks: torch.Tensor, fmt: OnnxFormat) -> tuple[torch.Tensor, torch.Tensor]:
    # ORT scans only real weights; padding zeros would never have the larger magnitude
    mn = blocks.amin(dim=-1)  # (N, n_blocks)
    mx = blocks.amax(dim=-1)
    m = torch.where(mx.abs() > mn.abs(), mx, mn)
    # the sign sends m to code 0 (offset -mid): the side of the range with one more code
    mid = 1 << (fmt.bits - 1)
    scale = -m / mid
    return scale, torch.full_like(scale, float(mid))


def quantize(weight: torch.Tensor, fmt: OnnxFormat) -> BlockQuant:
    """ORT's RTN quantization of ``weight [out, in]`` (= MatMul's B transposed)."""
    blocks = _blocks(weight, fmt.block)  # (N, n_blocks, block)
    params = _symmetric_params if fmt.symmetric else _asymmetric_params
    scale, zp = params(blocks, fmt)  # (N, n_blocks) each
    reciprocal = torch.where(scale == 0, 0.0, 1.0 / scale)
    # two roundings, as ORT's compiled loop does them (a fused multiply-add differs at ties)
    scaled = blocks * reciprocal[..., None] + zp[..., None]  # (N, n_blocks, block)
    codes = roundf(scaled).clamp(0, fmt.qmax).to(torch.uint8)
    in_features = weight.shape[1]
    real = torch.arange(codes.shape[1] * fmt.block, device=codes.device) < in_features
    codes = codes * real.reshape(codes.shape[1:])  # ORT never writes codes for padding
    return BlockQuant(fmt, in_features, codes, scale, zp.to(torch.uint8))


def join(parts: list[BlockQuant]) -> BlockQuant:
    """Blocks of columns quantized one after another (schemes/feedback.py) as one matrix."""
    return BlockQuant(parts[0].fmt, sum(p.in_features for p in parts), torch.cat([p.codes for p in parts], dim=1),
                      torch.cat([p.scales for p in parts], dim=1), torch.cat([p.zero_points for p in parts], dim=1))


def dequantize(quant: BlockQuant) -> torch.Tensor:
    """What MatMulNBits computes with: fp32 ``[out, in]``."""
    values = (quant.codes.float() - quant.zero_points.float()[..., None]) * quant.scales[..., None]
    return values.reshape(values.shape[0], -1)[:, : quant.in_features]


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``(..., n)`` of ``bits``-bit values -> ``(..., n * bits / 8)``, low bits first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte) << shifts
    return np.bitwise_or.reduce(grouped, axis=-1).astype(np.uint8)


def _stale_tail(flat_codes: np.ndarray, quant: BlockQuant) -> np.ndarray:
    """Reproduce the junk ORT's packer leaves in the byte where K ends.

    MLAS packs ``per_byte`` codes at a time from a small buffer it only partly refills at
    the end of K, so that byte's padding slots keep the codes one byte earlier, unless
    that byte opened the thread's share of rows (``block * per_byte`` of them), whose buffer
    starts at 0. The runtime never reads these slots; only byte equality needs them.
    """
    fmt, k = quant.fmt, quant.in_features
    per_byte = fmt.per_byte
    byte_start = k - k % per_byte
    if byte_start == k or byte_start % (fmt.block * per_byte) == 0:
        return flat_codes
    flat_codes = flat_codes.copy()
    flat_codes[:, k : byte_start + per_byte] = flat_codes[:, k - per_byte : byte_start]
    return flat_codes


def pack(quant: BlockQuant) -> MatMulNBitsInitializers:
    """The exact MatMulNBits initializers ORT's quantizer writes for ``quant``."""
    fmt = quant.fmt
    n, n_blocks, _ = quant.codes.shape
    flat_codes = _stale_tail(quant.codes.cpu().numpy().reshape(n, -1), quant)  # (N, n_blocks*block)
    b = _pack_bits(flat_codes, fmt.bits).reshape(n, n_blocks, -1)
    scales = quant.scales.cpu().numpy().astype(np.float32)
    if fmt.symmetric:
        return MatMulNBitsInitializers(b, scales, None)
    zero_points = quant.zero_points.cpu().numpy()
    # ORT fills the last byte's unused slots with the symmetric zero point, 2^(bits-1)
    padding = ((0, 0), (0, -n_blocks % fmt.per_byte))
    zero_points = np.pad(zero_points, padding, constant_values=1 << (fmt.bits - 1))
    return MatMulNBitsInitializers(b, scales, _pack_bits(zero_points, fmt.bits))


FORMATS: dict[str, OnnxFormat] = {
    f.name: f
    for f in (
        OnnxFormat(bits, block, symmetric)
        for bits in BITS
        for block in BLOCKS
        for symmetric in (False, True)
    )
}

SCHEME = Scheme(
    name="onnx",
    formats=FORMATS,
    default_choices=tuple(
        OnnxFormat(bits, block, False).name for bits in BITS for block in DEFAULT_BLOCKS
    ),
    description=(
        "ONNX Runtime MatMulNBits (com.microsoft): 2-, 4- or 8-bit blockwise RTN along K with "
        "fp32 scales and optional packed zero points, bit-exact with ORT's own quantizer. "
        "Needs ORT >= 1.24 for 2-bit nodes."
    ),
)
