"""The CoA-LoRA paper's format: LQ-LoRA NormalFloat codes with double-quantized scales.

No runtime kernel reads this format; it is the paper's own search space, simulated in
PyTorch. The definition (docs/PAPER.md, "The paper's quantization format") is followed
step by step, in fp32, so that ``roundtrip`` is the format rather than an approximation:

1. the row-major matrix is cut into blocks of ``B0`` weights; ``s0`` = absmax per block,
   ``o`` = min of all ``s0`` (one fp32 offset per tensor), ``s0' = s0 - o``;
2. blocks form groups of ``B1``; ``s1`` = max of ``s0'`` per group, rounded (to nearest
   even) to the scale dtype;
3. ``q0 = clamp(round_half_even(s0' * (2^b0 - 1) / s1), 0, 2^b0 - 1)``;
4. weights are divided by the encoding scale ``q0 / ((2^b0 - 1) / s1) + o`` and bucketed
   on the codebook's midpoints, ties to the lower code, |x| > 1 saturating;
5. ``W_hat = codebook[code] * (o + q0 * s1 / (2^b0 - 1))``.

Two generalisations of the paper, both needed to hold every matrix of a real model:
when the block count is not a multiple of ``B1`` the last group is simply shorter (its
``s1`` is the max over the blocks it has), and a group whose ``s1`` is zero stores
``q0 = 0`` (every block in it then has scale ``o``, which is what the limit gives).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from coalora_edge.errors import SchemeError
from coalora_edge.schemes.base import Format, Scheme, Shape

CODE_BITS = (2, 3, 4, 8)
SCALE_BITS = (2, 3, 4, 8)
#: second-level scale dtype -> (torch dtype, stored bits b1)
SCALE_DTYPES = {
    "bf16": (torch.bfloat16, 16),
    "fp16": (torch.float16, 16),
    "fp32": (torch.float32, 32),
}
BLOCKS = (16, 32, 64)
GROUPS = (16, 64, 256)
OFFSET_BITS = 32  # the single fp32 offset ``o`` per tensor

#: NormalFloat tail probability: the outermost codes sit at the delta / 1 - delta quantiles.
DELTA = 0.9677083


def nf_codebook(bits: int) -> torch.Tensor:
    """The NF-``bits`` codebook, ascending fp32: 2^(b-1)-1 negatives, 0, 2^(b-1) positives.

    Probabilities are the float64 linspaces rounded to fp32 (so the table does not depend
    on how a library evaluates an fp32 linspace); quantiles are evaluated in float64 and
    rounded to fp32. sigma makes p = 1 - delta, delta map to -1, +1 exactly; rounding
    delta to fp32 would leave the ends one ulp inside, so they are written as +-1.
    """
    half = 2 ** (bits - 1)
    probs = torch.cat([
        torch.linspace(1 - DELTA, 0.5, half, dtype=torch.float64)[:-1],
        torch.linspace(0.5, DELTA, half + 1, dtype=torch.float64),
    ]).float()  # (2^b,)
    sigma = -1 / (math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * DELTA, dtype=torch.float64)))
    values = (sigma * math.sqrt(2) * torch.erfinv(2 * probs.double() - 1)).float()
    values[0], values[-1] = -1.0, 1.0
    return values


CODEBOOKS = {b: nf_codebook(b) for b in CODE_BITS}
#: code i is chosen for x in (MIDPOINTS[i-1], MIDPOINTS[i]]: a tie goes to the lower code
MIDPOINTS = {b: (cb[:-1] + cb[1:]) / 2 for b, cb in CODEBOOKS.items()}


@dataclass(frozen=True)
class NFCodes:
    """What a tensor in this format stores, for exporters that write the codes themselves."""

    codes: torch.Tensor  # (out, in) uint8: index into the NF-b codebook
    q0: torch.Tensor  # (n_blocks,) uint8: first-level scale codes, row-major block order
    s1: torch.Tensor  # (n_groups,) second-level scales, in the format's scale dtype
    o: torch.Tensor  # () fp32 offset


@dataclass(frozen=True, repr=False)
class NFFormat(Format):
    """One row of the table, named ``nf{b}-s{b0}-{dtype}-{B0}x{B1}``; ``encode`` and
    ``decode`` split ``roundtrip`` at the stored numbers."""

    bits: int  # b: code bits per weight
    scale_bits: int  # b0: bits of each first-level scale code
    scale_dtype: str  # dtype of the second-level scales (b1 = its width)
    block: int  # B0: weights per first-level scale; blocks never straddle rows
    group: int  # B1: first-level blocks per second-level scale (the last group may be short)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nf{self.bits}-s{self.scale_bits}-{self.scale_dtype}-{self.block}x{self.group}"

    def _levels(self, device: torch.device) -> torch.Tensor:
        # A tensor, not a Python int: ``int / tensor`` is reciprocal-then-multiply, and CUDA
        # divides by a CPU scalar through its reciprocal; both round twice.
        return torch.tensor(float(2**self.scale_bits - 1), device=device)

    @property
    def _s1_bits(self) -> int:
        return SCALE_DTYPES[self.scale_dtype][1]

    @property
    def nominal_bits_per_weight(self) -> float:
        return self.bits + self.scale_bits / self.block + self._s1_bits / (self.block * self.group)

    @property
    def fields(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "scale_bits": self.scale_bits,
            "scale_dtype": self.scale_dtype,
            "block": self.block,
            "group": self.group,
        }

    def nbytes(self, shape: Shape) -> int:
        """``ceil((b*numel + b0*n_blocks + b1*n_groups + 32) / 8)`` with
        ``n_blocks = numel / B0``, ``n_groups = ceil(n_blocks / B1)``; the 32 bits are ``o``."""
        self._check_shape(shape)
        numel = shape[0] * shape[1]
        n_blocks = numel // self.block
        n_groups = -(-n_blocks // self.group)
        bits = (
            self.bits * numel
            + self.scale_bits * n_blocks
            + self._s1_bits * n_groups
            + OFFSET_BITS
        )
        return -(-bits // 8)

    def roundtrip(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        if imatrix is not None:
            raise SchemeError(
                f"nf format {self.name} takes no importance matrix; pass imatrix=None"
            )
        return self.decode(self.encode(weight))

    def encode(self, weight: torch.Tensor) -> NFCodes:
        """Quantize ``weight [out, in]`` (PAPER.md steps 1-4) into the stored numbers."""
        self._check_shape(tuple(weight.shape))
        w = weight.detach().to(torch.float32)
        if not torch.isfinite(w).all():
            raise SchemeError(
                f"nf format {self.name}: the weight has inf or NaN values; "
                "fix the checkpoint before quantizing"
            )
        blocks = w.reshape(-1, self.block)  # (n_blocks, B0)
        s0 = blocks.abs().amax(dim=1)  # (n_blocks,)
        o = s0.min()  # ()
        s0p = s0 - o  # (n_blocks,), >= 0
        s1 = self._group_max(s0p).to(SCALE_DTYPES[self.scale_dtype][0])  # (n_groups,)
        if torch.isinf(s1).any():
            raise SchemeError(
                f"nf format {self.name}: a block scale of {s0p.max().item():g} overflows "
                f"{self.scale_dtype}; choose a bf16 or fp32 scale dtype"
            )
        s1_blk = self._per_block(s1, len(s0p))  # (n_blocks,) fp32
        levels = self._levels(w.device)
        q0 = torch.where(
            s1_blk > 0, torch.round(s0p * levels / s1_blk).clamp(0, 2**self.scale_bits - 1), 0.0
        )  # (n_blocks,)
        enc = q0 / (levels / s1_blk) + o  # (n_blocks,)
        # A zero encoding scale means a zero decoding scale: every code decodes to 0, and
        # 0/0 must not reach the bucketing, so such blocks store the code of 0.
        x = torch.where(enc[:, None] == 0, 0.0, blocks / enc[:, None])  # (n_blocks, B0)
        mid = MIDPOINTS[self.bits].to(x.device)
        codes = torch.searchsorted(mid, x, side="left", out_int32=True)  # (n_blocks, B0)
        return NFCodes(
            codes=codes.to(torch.uint8).reshape(w.shape),
            q0=q0.to(torch.uint8),
            s1=s1,
            o=o,
        )

    def decode(self, stored: NFCodes) -> torch.Tensor:
        """Dequantize (PAPER.md step 5): ``codebook[code] * (o + q0 * s1 / (2^b0 - 1))``, fp32."""
        q0 = stored.q0.to(torch.float32)  # (n_blocks,)
        s1_blk = self._per_block(stored.s1, len(q0))  # (n_blocks,)
        scale = stored.o + q0 * s1_blk / self._levels(q0.device)  # (n_blocks,)
        codebook = CODEBOOKS[self.bits].to(q0.device)
        values = codebook.index_select(0, stored.codes.reshape(-1).to(torch.int32))
        return (values.view(-1, self.block) * scale[:, None]).view(stored.codes.shape)

    def _group_max(self, s0p: torch.Tensor) -> torch.Tensor:
        n_groups = -(-len(s0p) // self.group)
        # s0' >= 0, so zero padding never wins a max: the short last group keeps its own max.
        padded = F.pad(s0p, (0, n_groups * self.group - len(s0p)))  # (n_groups * B1,)
        return padded.view(n_groups, self.group).amax(dim=1)  # (n_groups,)

    def _per_block(self, s1: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return s1.to(torch.float32).repeat_interleave(self.group)[:n_blocks]  # (n_blocks,)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or not self.can_hold((shape[0], shape[1])):
            raise SchemeError(
                f"nf format {self.name} cannot hold a matrix of shape {list(shape)}: it needs "
                f"2-D weights whose rows are a multiple of its block {self.block}; "
                "choose a format with a smaller block"
            )


FORMATS = {
    f.name: f
    for f in itertools.starmap(
        NFFormat, itertools.product(CODE_BITS, SCALE_BITS, SCALE_DTYPES, BLOCKS, GROUPS)
    )
}

# A ladder from 2.06 to 8.63 bits. At a fixed code width the block B0 is the knob that
# buys accuracy (a finer absmax), so each of nf2/nf3/nf4 comes in B0 = 64/32/16 with
# QLoRA's double quantization (8-bit scales, fp32 second level), whose scale cost is
# small. A 4-bit-scale bf16 variant per width gives the cheapest point of each step, nf8
# at 64x256 is near lossless for sensitive matrices, and 16x16 reaches the table's top so
# the search spans every budget; together they vary every field the adapter embeds.
DEFAULT_CHOICES = (
    "nf2-s4-bf16-64x256",
    "nf2-s8-fp32-64x256",
    "nf2-s8-fp32-32x256",
    "nf2-s8-fp32-16x256",
    "nf3-s4-bf16-64x256",
    "nf3-s8-fp32-64x256",
    "nf3-s8-fp32-32x256",
    "nf3-s8-fp32-16x256",
    "nf4-s4-bf16-64x256",
    "nf4-s8-fp32-64x256",
    "nf4-s8-fp32-32x256",
    "nf4-s8-fp32-16x256",
    "nf8-s8-fp32-64x256",
    "nf8-s8-fp32-16x16",
)

SCHEME = Scheme(
    name="nf",
    formats=FORMATS,
    default_choices=DEFAULT_CHOICES,
    description=(
        "CoA-LoRA / LQ-LoRA NormalFloat (2/3/4/8-bit codes) with double-quantized block "
        "scales; the paper's search space, simulated in PyTorch (no runtime kernel)"
    ),
)
