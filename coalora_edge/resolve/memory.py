"""How much memory a model needs on a device: documented, conservative estimates.

    total = weights            exact bytes of the adapted matrices' configuration (caller)
          + non_adapted        embeddings, output head, norms, as stored (caller)
          + sidecar            LoRA A and B when the runtime applies them (adapter_mode sidecar)
          + kv_cache           2 x layers x kv_heads x head_dim x context x batch x dtype bytes
                               (context x batch rounded up to the runtime's KV cell padding,
                               times the copies the runtime holds at once)
          + compute            the runtime's working buffers (formulas below)
          + reserved           the profile's OS and host application share
    fits  = total <= memory

Weights and KV cache are exact; the compute buffers are an upper-bound estimate, because
both runtimes size them from the graph at run time. Everything is counted as resident:
llama.cpp memory-maps weights but turns mmap off as soon as a LoRA is loaded, and a
device that pages weights in and out is too slow to count as "runs".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from coalora_edge.errors import ProfileError
from coalora_edge.model.dims import ModelDims
from coalora_edge.profiles import DeviceProfile
from coalora_edge.runtimes import get_runtime
from coalora_edge.schemes.base import Shape

F32 = 4  # both runtimes compute activations, scores and logits in fp32 on CPU


def kv_cells(runtime: str, context: int, batch: int) -> int:
    """Token slots the runtime allocates for ``batch`` sequences of ``context`` tokens."""
    padding = get_runtime(runtime).kv_cell_padding
    return -(-context * batch // padding) * padding


def kv_cache_bytes(dims: ModelDims, cells: int, dtype: str) -> int:
    """Keys and values of every layer for ``cells`` token slots, exactly as ggml sizes them.

    One cell holds ``kv_heads x head_dim`` keys and as many values per layer. Quantized
    types store each head's vector in blocks (q8_0: 32 elements in 34 bytes), so
    llama.cpp refuses them unless the block divides head_dim. ONNX Runtime's f32/f16 are
    ggml's too.
    """
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[dtype.upper()]]
    if dims.head_dim % block:
        raise ProfileError(
            f"kv_cache_dtype {dtype} stores keys in blocks of {block}, which do not divide this model's "
            f"head_dim {dims.head_dim} (llama.cpp refuses it); choose f16 in the profile"
        )
    return 2 * dims.layers * cells * (dims.kv_heads * dims.head_dim // block) * block_bytes


def sidecar_bytes(shapes: Iterable[Shape], rank: int, dtype_bytes: int = F32) -> int:
    """LoRA kept beside the weights: A ``(rank, in)`` and B ``(out, rank)`` for each matrix."""
    return sum(rank * (out_features + in_features) for out_features, in_features in shapes) * dtype_bytes


# llama.cpp sizes one compute buffer for the worst graph it will run: a micro-batch of
# n_ubatch tokens (512, or the context if shorter) attending to every KV cell, without
# flash attention (llama-cpp-python's default). Its allocator reuses memory between
# operations, so the sum of the tensors that can be alive together bounds the peak:
#   attention scores       heads x cells x tokens
#   attention mask         cells x tokens
#   logits                 vocab x tokens
#   hidden states and MLP  tokens x (4 x hidden + 3 x intermediate)
# llama-cpp-python adds its own fp32 scores array, n_batch (= tokens) x vocab.
# Checked against the "CPU compute buffer size" llama.cpp logs (llama-cpp-python 0.3.36,
# see tests/test_memory.py): the estimate is 1.02-2.0x the measured buffer, tightest when
# the attention scores dominate (long contexts), loosest when the logits do.
LLAMACPP_UBATCH = 512


def llamacpp_compute_bytes(dims: ModelDims, context: int, batch: int) -> int:
    cells = kv_cells("llama.cpp", context, batch)
    tokens = min(LLAMACPP_UBATCH, context * batch)
    graph = tokens * (dims.heads * cells + cells + dims.vocab + 4 * dims.hidden + 3 * dims.intermediate)
    python_scores = tokens * dims.vocab
    return F32 * (graph + python_scores)


# ONNX Runtime runs the exported graph (optimum) as plain operators: the worst step is the
# prompt filling the whole context at once, where attention materialises its causal mask,
# scores and softmax (batch x [heads x] context^2 each) and the head returns logits for
# every position. Its CPU arena grows in powers of two, so up to twice the peak is held.
# Reasoned from the graph, not yet measured: every term is counted as alive at once, so
# it errs high.
ORT_ARENA_GROWTH = 2


def onnxruntime_compute_bytes(dims: ModelDims, context: int, batch: int) -> int:
    tokens = context * batch
    graph = tokens * ((2 * dims.heads + 1) * context + dims.vocab + 4 * dims.hidden + 3 * dims.intermediate)
    return ORT_ARENA_GROWTH * F32 * graph


@dataclass(frozen=True)
class MemoryBreakdown:
    """Each term in bytes; ``total`` includes the reserved share."""

    weights: int
    non_adapted: int
    sidecar: int
    kv_cache: int
    compute: int
    reserved: int
    memory: int

    @property
    def total(self) -> int:
        return self.weights + self.non_adapted + self.sidecar + self.kv_cache + self.compute + self.reserved

    @property
    def available(self) -> int:
        """What the model may use: the device's memory less the reserved share."""
        return self.memory - self.reserved

    @property
    def headroom(self) -> int:
        """Bytes to spare; negative is by how much it does not fit."""
        return self.memory - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "available": self.available, "headroom": self.headroom, "fits": self.fits}


def estimate_memory(
    profile: DeviceProfile, dims: ModelDims, *, weights_bytes: int, non_adapted_bytes: int, lora_bytes: int = 0,
) -> MemoryBreakdown:
    """The memory a model needs under ``profile``; ``lora_bytes`` counts only in sidecar mode."""
    runtime = get_runtime(profile.runtime)
    cells = kv_cells(profile.runtime, profile.context_length, profile.batch)
    return MemoryBreakdown(
        weights=weights_bytes,
        non_adapted=non_adapted_bytes,
        sidecar=lora_bytes if profile.adapter_mode == "sidecar" else 0,
        kv_cache=runtime.kv_copies * kv_cache_bytes(dims, cells, profile.kv_cache_dtype),
        compute=runtime.hook("compute_bytes")(dims, profile.context_length, profile.batch),
        reserved=profile.reserved_bytes,
        memory=profile.memory_bytes,
    )
