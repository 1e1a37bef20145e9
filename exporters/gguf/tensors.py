"""What each tensor of a trained configuration becomes in the GGUF files, and the files.

    adapted matrix, merged:   ggml bytes of  W + s B'A            in the configuration's format,
                              rounded to nearest or for the trained layer's outputs
    adapted matrix, sidecar:  ggml bytes of  W  (what training used) + an F32 LoRA (A, B')
    anything else:            resolve/non_adapted.py's type (Q8_0 / F16 matrices, F32 vectors)

Quantization runs on the Hugging Face layout, through the same ggml call and importance
matrix as training (QuantCache), and the llama.cpp row order is applied to the bytes
afterwards: a row permutation commutes with row-wise block quantization, so the written
bytes are the trained ones, only reordered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np
import torch

from coalora_edge import __version__
from coalora_edge.adapter.layer import fold
from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.bundle.restore import Restored
from coalora_edge.exporters.common.merge import feedback_rounded
from coalora_edge.exporters.gguf.arch import Target
from coalora_edge.exporters.gguf.vocab import Vocab
from coalora_edge.resolve.non_adapted import base_tensors
from coalora_edge.schemes.gguf import FORMATS, GGUFFormat
from coalora_edge.schemes.feedback import GroupQuantizer
from coalora_edge.schemes.quantize import Configuration

RUNTIME = "llama.cpp"
UNQUANTIZED = "F32"  # vectors (norms, biases) and the LoRA factors


@dataclass(frozen=True)
class Stored:
    """One tensor as the file holds it, kept in the Hugging Face row order."""

    hf_name: str
    name: str  # GGUF name
    type: str  # ggml type name
    data: np.ndarray  # uint8 blocks (rows, row_bytes), or float32 for F32
    order: np.ndarray | None  # llama.cpp row order (Target.row_order); None: unchanged
    columns: int  # input features (elements per row)

    def file_array(self) -> np.ndarray:
        return self.data if self.order is None else self.data[self.order]

    def dequantized(self) -> torch.Tensor:
        """fp32 values in the Hugging Face layout: what llama.cpp computes with."""
        if self.type == UNQUANTIZED:
            return torch.from_numpy(self.data.copy())
        return FORMATS[self.type].dequantize(self.data, self.columns)


def encode(type_name: str, value: torch.Tensor, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """``value`` in ggml type ``type_name``: block bytes for matrices, float32 for F32."""
    if type_name == UNQUANTIZED:
        return value.detach().to("cpu", torch.float32).contiguous().numpy()
    return FORMATS[type_name].quantize(value, imatrix)


def stored(target: Target, hf_name: str, type_name: str, value: torch.Tensor,
           imatrix: torch.Tensor | None = None) -> Stored:
    name = target.tensor_name(hf_name)
    return Stored(hf_name, name, type_name, encode(type_name, value, imatrix),
                  target.row_order(name, value.shape[0]), value.shape[-1])


def adapted_tensors(target: Target, restored: Restored, config: Configuration, merged: bool,
                    calibration: torch.Tensor | None = None) -> list[Stored]:
    """The adapted matrices in their configuration's storage formats; ``merged``: with the
    configuration's LoRA folded in, rounded to nearest, or with error feedback on the
    ``calibration`` blocks when given (exporters/common/merge.py)."""
    wrapper = restored.wrapper
    formats = {m.name: wrapper.scheme.storage(config[m.name], m.shape) for m in wrapper.matrices}
    # QuantCache's rule: the importance matrix goes to every format that takes one.
    imatrix = {n: wrapper.cache.imatrix.get(n) if fmt.uses_imatrix else None for n, fmt in formats.items()}
    if calibration is not None:
        quantizers = {n: _group_quantizer(fmt, imatrix[n]) for n, fmt in formats.items()}
        parts = feedback_rounded(restored, config, formats, quantizers, calibration)
        return [Stored(f"{m.name}.weight", (name := target.tensor_name(f"{m.name}.weight")), formats[m.name].name,
                       np.concatenate(parts[m.name], axis=1), target.row_order(name, m.shape[0]), m.shape[1])
                for m in wrapper.matrices]
    lora = wrapper.collapsed_lora(config) if merged else {}
    tensors = []
    for m in wrapper.matrices:
        weight = wrapper.layers[m.name].base_layer.weight.detach().float()  # (out, in)
        if merged:
            weight = fold(weight, *lora[m.name], wrapper.scaling)  # (out, in)
        tensors.append(stored(target, f"{m.name}.weight", formats[m.name].name, weight, imatrix[m.name]))
    return tensors


def _group_quantizer(fmt: GGUFFormat, imatrix: torch.Tensor | None) -> GroupQuantizer:
    """ggml's own quantizer on a block of whole ggml blocks: row bytes concatenate."""
    def quantize_group(columns: torch.Tensor, first: int) -> tuple[np.ndarray, torch.Tensor]:
        part = None if imatrix is None else imatrix[first: first + columns.shape[1]]
        blocks = fmt.quantize(columns, part)  # (out, group bytes)
        return blocks, fmt.dequantize(blocks, columns.shape[1])

    return quantize_group


def hf_parameters(wrapper: CoALoRAModel) -> dict[str, torch.nn.Parameter]:
    """The wrapped model's parameters under their Hugging Face names."""
    return {n.replace(".base_layer.", "."): p for n, p in wrapper.model.named_parameters()}


def other_tensors(target: Target, wrapper: CoALoRAModel) -> list[Stored]:
    """Embeddings, head (absent when tied), norms and biases, in resolve/non_adapted.py's types."""
    params = hf_parameters(wrapper)
    return [stored(target, t.name, t.type, params[t.name].detach())
            for t in base_tensors(wrapper.model, [m.name for m in wrapper.matrices], RUNTIME)]


def lora_tensors(target: Target, wrapper: CoALoRAModel, config: Configuration) -> list[Stored]:
    """The configuration's collapsed LoRA as llama.cpp adapter tensors ``<name>.lora_a/b``."""
    tensors = []
    for name, (A, B) in wrapper.collapsed_lora(config).items():  # (r, in), (out, r)
        base = target.tensor_name(f"{name}.weight")
        order = target.row_order(base, B.shape[0])  # rows of B are the output features
        tensors.append(Stored(f"{name}.lora_A", f"{base}.lora_a", UNQUANTIZED, encode(UNQUANTIZED, A), None, A.shape[1]))
        tensors.append(Stored(f"{name}.lora_B", f"{base}.lora_b", UNQUANTIZED, encode(UNQUANTIZED, B), order, B.shape[1]))
    return tensors


def write_model(path: Path, target: Target, vocab: Vocab, tensors: Iterable[Stored], name: str) -> None:
    writer = _writer(path, target, name)
    target.write_hparams(writer)
    vocab.write(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write(writer, tensors)


def write_adapter(path: Path, target: Target, tensors: Iterable[Stored], alpha: float, name: str) -> None:
    """A llama.cpp LoRA adapter: it scales ``B A`` by ``alpha / rank`` (times the user's scale, 1)."""
    writer = _writer(path, target, name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    _write(writer, tensors)


def _writer(path: Path, target: Target, name: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, target.name)
    writer.add_name(name)
    writer.add_string("general.quantized_by", f"coalora-edge {__version__}")
    return writer


def _write(writer: gguf.GGUFWriter, tensors: Iterable[Stored]) -> None:
    for t in tensors:
        array = np.ascontiguousarray(t.file_array())
        raw = None if t.type == UNQUANTIZED else gguf.GGMLQuantizationType[t.type]
        writer.add_tensor(t.name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
