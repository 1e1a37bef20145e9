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
from typing import Any, Callable, Iterable, Mapping

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from coalora_edge.errors import ModelError, ProfileError
from coalora_edge.profiles import DeviceProfile
from coalora_edge.schemes.base import Shape

F32 = 4  # both runtimes compute activations, scores and logits in fp32 on CPU


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a decoder-only transformer that its memory depends on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelDims:
        """From a Hugging Face config: a ``PretrainedConfig`` or the dict of ``config.json``."""
        get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
        required = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
        missing = [key for key in required if not isinstance(get(key), int)]
        if missing:
            raise ModelError(
                f"model config has no integer {', '.join(missing)}; the memory model needs the "
                "Llama-style config keys (num_hidden_layers, num_attention_heads, hidden_size, ...)"
            )
        heads = get("num_attention_heads")
        return cls(
            layers=get("num_hidden_layers"),
            heads=heads,
            # Configs without these mean plain multi-head attention, hidden / heads wide
            # heads and (GPT-2, Falcon) an MLP 4 x hidden wide.
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size") or 4 * get("hidden_size"),
            vocab=get("vocab_size"),
        )


def kv_cells(runtime: str, context: int, batch: int) -> int:
    """Token slots the runtime allocates for ``batch`` sequences of ``context`` tokens."""
    padding = RUNTIME_MEMORY[runtime].kv_cell_padding
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
class RuntimeMemory:
    """How a runtime spends memory beyond the weights."""

    kv_cell_padding: int  # the KV cache is allocated in whole chunks of this many tokens
    kv_copies: int  # caches alive at once
    compute: Callable[[ModelDims, int, int], int]  # (dims, context, batch) -> working buffers


RUNTIME_MEMORY = {
    # llama.cpp rounds its one cache up to 256-cell chunks (n_ctx 100 -> 256 cells, 300 ->
    # 512; llama-cpp-python 0.3.36).
    "llama.cpp": RuntimeMemory(kv_cell_padding=256, kv_copies=1, compute=llamacpp_compute_bytes),
    # ONNX Runtime's cache grows token by token, but each step returns it as new "present"
    # tensors while the "past" ones it was given are still alive: two copies.
    "onnxruntime": RuntimeMemory(kv_cell_padding=1, kv_copies=2, compute=onnxruntime_compute_bytes),
}


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
    runtime = RUNTIME_MEMORY[profile.runtime]
    cells = kv_cells(profile.runtime, profile.context_length, profile.batch)
    return MemoryBreakdown(
        weights=weights_bytes,
        non_adapted=non_adapted_bytes,
        sidecar=lora_bytes if profile.adapter_mode == "sidecar" else 0,
        kv_cache=runtime.kv_copies * kv_cache_bytes(dims, cells, profile.kv_cache_dtype),
        compute=runtime.compute(dims, profile.context_length, profile.batch),
        reserved=profile.reserved_bytes,
        memory=profile.memory_bytes,
    )
