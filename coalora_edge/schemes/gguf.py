"""The ``gguf`` scheme: ggml tensor types, quantized by ggml itself, byte for byte.

Each format is one ggml type. Block size and bytes per block come from gguf-py's
``GGML_QUANT_SIZES`` table; the arithmetic is ggml's (``schemes/ggml.py``), so the
roundtrip used in training is exactly what llama.cpp computes with, and
:meth:`GGUFFormat.quantize` gives the bytes the GGUF exporter writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from coalora_edge.errors import SchemeError
from coalora_edge.schemes import ggml
from coalora_edge.schemes.base import Format, Scheme, Shape

#: What the configuration search explores by default: the K-quant ladder plus Q8_0.
DEFAULT_CHOICES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
#: Selectable on request; also every type llama.cpp's fallback can store.
OTHER_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "F16")

#: llama.cpp's demotion of a type whose block does not divide a row (``tensor_type_fallback``
#: in src/llama-quant.cpp, llama-cpp-python 0.3.36). Types not listed (block <= 32) go to
#: F16, and so does any demotion whose own block still does not divide the row.
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}
LAST_RESORT = "F16"

#: llama.cpp's single-token decode time per weight of each type, relative to Q4_K (facts
#: for search/speed.py). CPU backend, 1 thread, a 512-wide random Llama that fits in the
#: cache (compute-bound: where kernels differ most); a layer's time, t(6 layers) - t(1
#: layer) over 5, per model the median token of the fastest of 9 rotations. Measured on
#: a 2-vCPU AMD EPYC (x86-64, AVX2, 32 MiB L3), llama-cpp-python 0.3.36 built with
#: GGML_NATIVE=OFF, by `scripts/env.sh python bench/decode_cost.py` (BENCHMARKS.md).
#: Other CPUs (ARM NEON, AVX-512) run other kernels: measure there with the same command.
DECODE_COST = {
    "Q2_K": 1.17, "Q3_K": 1.61, "Q4_K": 1.00, "Q5_K": 1.75, "Q6_K": 1.56, "Q8_0": 1.86, "Q4_0": 1.05,
    "Q4_1": 1.72, "Q5_0": 2.02, "Q5_1": 2.06, "IQ4_NL": 1.06, "IQ4_XS": 1.73, "F16": 2.99,
}

#: Types whose ggml quantizer ignores an importance matrix: Q8_0 always rounds to nearest
#: (``quantize_q8_0`` discards it) and F16 is a plain conversion.
IMATRIX_FREE = frozenset({"Q8_0", "F16"})


class GGUFFormat(Format):
    """One ggml type, e.g. ``GGUFFormat("Q4_K")``."""

    def __init__(self, name: str) -> None:
        try:
            self.type = GGMLQuantizationType[name]
        except KeyError:
            raise SchemeError(f"{name!r} is not a ggml type; see gguf.GGMLQuantizationType") from None
        self.name = name
        self.block, self.type_size = GGML_QUANT_SIZES[self.type]
        self.uses_imatrix = name not in IMATRIX_FREE

    @property
    def nominal_bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    @property
    def fields(self) -> dict[str, Any]:
        return {"type": self.name}

    def nbytes(self, shape: Shape) -> int:
        out, n_in = shape
        self._check_holds(shape)
        return out * (n_in // self.block) * self.type_size

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> np.ndarray:
        """``weight [out, in]`` -> ggml block bytes uint8 ``[out, row_bytes]``, as written to GGUF."""
        if weight.ndim != 2:
            raise SchemeError(f"expected a weight matrix [out, in], got shape {tuple(weight.shape)}")
        self._check_holds(tuple(weight.shape))
        if imatrix is not None and not self.uses_imatrix:
            raise SchemeError(f"ggml ignores an importance matrix for {self.name}; pass imatrix=None")
        return ggml.quantize(self.type, _numpy(weight), None if imatrix is None else _numpy(imatrix))

    def dequantize(self, blocks: np.ndarray, n_in: int) -> torch.Tensor:
        """Block bytes ``[out, row_bytes]`` -> fp32 ``[out, n_in]`` via ggml's ``to_float``."""
        return torch.from_numpy(ggml.dequantize(self.type, blocks, n_in))

    def roundtrip(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        blocks = self.quantize(weight, imatrix)  # (out, row_bytes)
        return self.dequantize(blocks, weight.shape[1]).to(weight.device)  # (out, in)

    def _check_holds(self, shape: tuple[int, ...]) -> None:
        if not self.can_hold(shape):
            raise SchemeError(
                f"{self.name} needs rows that are a multiple of {self.block}, got a "
                f"{shape[0]}x{shape[1]} matrix; use Scheme.storage() to get llama.cpp's fallback type"
            )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


FORMATS = {name: GGUFFormat(name) for name in DEFAULT_CHOICES + OTHER_TYPES}


def llama_cpp_fallback(fmt: Format, shape: Shape) -> str:
    """The type llama.cpp stores when ``fmt`` cannot hold ``shape``: one demotion, then F16."""
    demoted = FALLBACK.get(fmt.name, LAST_RESORT)
    return demoted if FORMATS[demoted].can_hold(shape) else LAST_RESORT


SCHEME = Scheme(
    name="gguf",
    formats=FORMATS,
    default_choices=DEFAULT_CHOICES,
    fallback=llama_cpp_fallback,
    decode_cost=DECODE_COST,
    description=(
        "llama.cpp GGUF tensor types (K-quants, legacy 32-blocks, IQ4, F16), quantized "
        "byte-exactly by ggml from llama-cpp-python; rows a type cannot hold fall back as "
        "llama-quant.cpp does"
    ),
)
