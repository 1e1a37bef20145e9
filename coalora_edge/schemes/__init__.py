"""Quantization schemes: exact per-matrix formats of the target runtimes.

``get_scheme("gguf" | "onnx" | "nf")`` returns a :class:`Scheme`. Modules are imported on
demand because ``gguf`` needs ggml's shared library from llama-cpp-python.
"""

from __future__ import annotations

import importlib

from coalora_edge.errors import SchemeError
from coalora_edge.schemes.base import Format, Scheme, Shape

#: scheme name -> module defining ``SCHEME``
SCHEME_MODULES = {
    "gguf": "coalora_edge.schemes.gguf",
    "onnx": "coalora_edge.schemes.onnx",
    "nf": "coalora_edge.schemes.nf",
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEME_MODULES:
        raise SchemeError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEME_MODULES)}")
    return importlib.import_module(SCHEME_MODULES[name]).SCHEME


__all__ = ["Format", "Scheme", "Shape", "SCHEME_MODULES", "get_scheme"]
