"""What each runtime stores besides the adapted matrices: embeddings, output head, norms,
biases. The resolver counts these bytes and the exporters write exactly these types, so
that "fits the device" and "the file on disk" agree.

The types are each runtime's ``base_types`` (coalora_edge.runtimes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from coalora_edge.runtimes import get_runtime

@dataclass(frozen=True)
class BaseTensor:
    name: str  # parameter name in the Hugging Face model
    shape: tuple[int, ...]
    type: str  # ggml type name (F32 for ONNX fp32 initializers)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.type]]
        numel = 1
        for d in self.shape:
            numel *= d
        return numel // block * size


def tensor_type(runtime: str, shape: tuple[int, ...]) -> str:
    matrix, fallback, other = get_runtime(runtime).base_types
    if len(shape) != 2:
        return other
    block = GGML_QUANT_SIZES[GGMLQuantizationType[matrix]][0]
    return matrix if shape[1] % block == 0 else fallback


def base_tensors(model: nn.Module, adapted: Iterable[str], runtime: str) -> list[BaseTensor]:
    """Every parameter the runtime stores that is not an adapted weight (tied ones once).

    ``model`` may be wrapped by a CoALoRAModel: names are then reported as in the plain
    Hugging Face model (``q_proj.base_layer.bias`` -> ``q_proj.bias``), and the LoRA
    factors inside adapted modules are not base tensors.
    """
    adapted = set(adapted)
    found = []
    for wrapped_name, p in model.named_parameters():  # remove_duplicate=True: a tied head is counted once
        name = wrapped_name.replace(".base_layer.", ".")
        module, _, leaf = name.rpartition(".")
        if module in adapted and leaf != "bias":  # the weight, lora_A, lora_B
            continue
        found.append(BaseTensor(name, tuple(p.shape), tensor_type(runtime, tuple(p.shape))))
    return found


def base_bytes(model: nn.Module, adapted: Iterable[str], runtime: str) -> int:
    return sum(t.nbytes for t in base_tensors(model, adapted, runtime))
