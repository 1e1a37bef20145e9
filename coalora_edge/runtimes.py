"""The runtimes coalora-edge ships to, one record each: everything the rest of the code
needs to know about a runtime, in one table (the way gguf-py's constants.py states ggml's
facts). Adding a runtime is adding a record here and the modules its hooks name.

Hooks are import paths (``"package.module:function"``), imported on use: the table pulls
in no runtime library, and a profile for llama.cpp never loads ONNX Runtime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from coalora_edge.errors import ProfileError


@dataclass(frozen=True)
class Runtime:
    name: str  # what a device profile's ``runtime`` says
    scheme: str  # the quantization scheme whose formats the runtime executes (coalora_edge.schemes)
    kv_cache_dtypes: tuple[str, ...]  # what it caches keys/values in; the first is the default
    kv_cell_padding: int  # the KV cache is allocated in whole chunks of this many tokens
    kv_copies: int  # KV caches alive at once
    compute_bytes: str  # hook: (ModelDims, context, batch) -> bytes of working buffers (resolve/memory.py)
    #: ggml type names of what it stores besides the adapted matrices: 2-D tensors, 2-D
    #: tensors whose rows are not a block multiple, everything else (norms, biases)
    base_types: tuple[str, str, str]
    min_decode_ratio: float  # default speed floor; > 0 only where the scheme has measured decode costs
    format_examples: str  # a format name and a pattern, for error messages
    artifact: str = ""  # the model file an export folder holds ("" where nothing exports to it)
    exporter: str = ""  # hook: module whose ``export(restored, config, out, ...)`` writes the artifact
    stream: str = ""  # hook: (model file, prompt, max_tokens, threads) -> the greedy text, piece by piece
    perplexity: str = ""  # hook: (export folder, blocks (n, T), threads) -> perplexity in the runtime

    @property
    def kv_cache_dtype(self) -> str:
        """The default: what a profile that names none caches keys/values in."""
        return self.kv_cache_dtypes[0]

    @property
    def suffix(self) -> str:
        return self.artifact[self.artifact.rfind("."):] if self.artifact else ""

    def hook(self, name: str) -> Callable[..., Any]:
        """The function a hook field names, imported now."""
        path = getattr(self, name)
        if not path:
            raise ProfileError(f"runtime {self.name} has no {name}; coalora-edge cannot do that for it yet")
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr) if attr else importlib.import_module(module)


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ProfileError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def for_scheme(scheme: str) -> Runtime | None:
    """The runtime that executes ``scheme``'s formats (the first registered), None if none does."""
    return next((r for r in RUNTIMES.values() if r.scheme == scheme), None)


def export_formats() -> dict[str, Runtime]:
    """``export --format`` name (the scheme's) -> the runtime its artifact runs in."""
    return {r.scheme: r for r in RUNTIMES.values() if r.exporter}


#: Export formats for a framework rather than a device runtime: they ship any scheme's
#: configuration as trained, and no device profile names them. ``export --format`` name ->
#: the module whose ``export(restored, config, out, ...)`` writes the folder.
FRAMEWORK_EXPORTERS = {"peft": "coalora_edge.exporters.peft.export"}


def for_artifact(suffix: str) -> Runtime | None:
    """The runtime whose model files end in ``suffix`` (".gguf")."""
    return next((r for r in RUNTIMES.values() if r.artifact and r.suffix == suffix), None)


register(Runtime(
    name="llama.cpp", scheme="gguf",
    # llama.cpp's --cache-type-k/-v; quantized V caches need flash attention
    kv_cache_dtypes=("f16", "f32", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"),
    # one cache, rounded up to 256-cell chunks (n_ctx 100 -> 256 cells; llama-cpp-python 0.3.36)
    kv_cell_padding=256, kv_copies=1,
    compute_bytes="coalora_edge.resolve.memory:llamacpp_compute_bytes",
    # what llama.cpp's own quantize does for a mixed model: embeddings and head at 8 bits, norms F32
    base_types=("Q8_0", "F16", "F32"),
    min_decode_ratio=0.95, format_examples="Q4_K or Q?_K",
    artifact="model.gguf", exporter="coalora_edge.exporters.gguf.export",
    stream="coalora_edge.exporters.gguf.llamacpp:stream",
    perplexity="coalora_edge.exporters.common.perplexity:llamacpp_perplexity",
))
register(Runtime(
    name="onnxruntime", scheme="onnx",
    kv_cache_dtypes=("f32", "f16"),  # the dtype of the exported model's past_key_values
    # the cache grows token by token, but each step returns it as new "present" tensors
    # while the "past" ones it was given are still alive: two copies
    kv_cell_padding=1, kv_copies=2,
    compute_bytes="coalora_edge.resolve.memory:onnxruntime_compute_bytes",
    base_types=("F32", "F32", "F32"),  # a CPU model holds fp32 initializers
    # no measured kernel costs; at accuracy level 4 mixed models decode as fast as uniform ones
    min_decode_ratio=0.0, format_examples="int4_b32_asym or int4_*",
    artifact="model.onnx", exporter="coalora_edge.exporters.onnx.export",
    stream="coalora_edge.exporters.onnx.generate:stream",
    perplexity="coalora_edge.exporters.common.perplexity:onnx_perplexity",
))
