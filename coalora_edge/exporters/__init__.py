"""Exporters: a bundle plus a resolved configuration -> files a runtime loads, verified in
that runtime (gguf.py for llama.cpp, onnx.py for ONNX Runtime). layout.py says what they
store besides the adapted matrices, so the resolver's memory figures match the files."""

#: scheme -> module with ``export(restored, config, out, *, adapter_mode, profile, force) -> dict``
#: (the content of OUT/export.json). Imported on use: each pulls in its runtime.
EXPORTERS = {
    "gguf": "coalora_edge.exporters.gguf",
    "onnx": "coalora_edge.exporters.onnx",
}
