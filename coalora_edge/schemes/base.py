"""What every quantization scheme is: a table of per-matrix formats.

A *format* turns one weight matrix ``[out, in]`` into the exact numbers a runtime will
compute with. Quantization always runs along ``in`` (one row of the matrix is one
contiguous run of blocks), which is how ggml rows and MatMulNBits' K axis are laid out.

A *scheme* is a named table of formats plus the rule for shapes a format cannot hold
(llama.cpp's fallback for GGUF). A *configuration* is one format name per matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from coalora_edge.errors import SchemeError
from coalora_edge.model.matrices import Shape


class Format(ABC):
    """One storage format. Subclasses are small: they know their numbers and their math."""

    name: str
    #: Weights along ``in`` that share scales; a row must be a multiple unless ``pads_rows``.
    block: int
    #: Whether rows that are not a block multiple are padded (ONNX) rather than refused.
    pads_rows: bool = False
    #: Whether ``roundtrip`` takes an importance matrix (ggml's imatrix, one value per input column).
    uses_imatrix: bool = False

    @property
    @abstractmethod
    def nominal_bits_per_weight(self) -> float:
        """Bits per weight including scales and zero points, for a row that is a block multiple."""

    @property
    @abstractmethod
    def fields(self) -> dict[str, Any]:
        """Categorical description (e.g. bits, block, symmetric) fed to the configuration model."""

    @abstractmethod
    def nbytes(self, shape: Shape) -> int:
        """Exact storage of a matrix of this shape in this format, in bytes."""

    @abstractmethod
    def roundtrip(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize then dequantize ``weight [out, in]``: fp32, exactly what the runtime computes.

        ``imatrix [in]`` is only accepted by formats with ``uses_imatrix``; the others raise
        SchemeError rather than silently ignoring it.
        """

    def can_hold(self, shape: Shape) -> bool:
        return self.pads_rows or shape[1] % self.block == 0

    def bits_per_weight(self, shape: Shape) -> float:
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


@dataclass(frozen=True)
class Scheme:
    """A named family of formats, with the default choice list the search explores."""

    name: str
    formats: Mapping[str, Format]
    default_choices: tuple[str, ...]
    #: For a format that cannot hold a shape: the name of the format the runtime would
    #: store instead (llama.cpp's fallback), or None when the shape is simply refused.
    fallback: Callable[[Format, Shape], str | None] = field(default=lambda fmt, shape: None)
    description: str = ""
    #: Measured single-token decode time per weight of each stored format in the scheme's
    #: runtime, relative to one reference format (search/speed.py); None where unmeasured.
    decode_cost: Mapping[str, float] | None = None

    def format(self, name: str) -> Format:
        try:
            return self.formats[name]
        except KeyError:
            known = ", ".join(self.formats)
            raise SchemeError(
                f"unknown {self.name} format {name!r}; choose one of: {known}"
            ) from None

    def storage(self, name: str, shape: Shape) -> Format:
        """The format that actually stores ``shape`` when ``name`` is chosen (after fallback)."""
        fmt = self.format(name)
        seen = [fmt.name]
        while not fmt.can_hold(shape):
            nxt = self.fallback(fmt, shape)
            if nxt is None or nxt in seen:
                raise SchemeError(
                    f"{self.name} format {name} cannot hold a {shape[0]}x{shape[1]} matrix "
                    f"(rows of {shape[1]} are not a multiple of its block {fmt.block}); "
                    "choose a format with a smaller block"
                )
            seen.append(nxt)
            fmt = self.format(nxt)
        return fmt

    def choices(self, names: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Validate a user's choice list (default: the scheme's defaults)."""
        names = tuple(names) if names else self.default_choices
        for n in names:
            self.format(n)
        if len(set(names)) != len(names):
            raise SchemeError(f"duplicate formats in choice list {list(names)}; list each once")
        return names
