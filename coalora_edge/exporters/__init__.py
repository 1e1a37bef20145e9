"""Exporters: a bundle plus a resolved configuration -> files a runtime loads, verified in
that runtime (gguf.py for llama.cpp, onnx.py for ONNX Runtime). layout.py says what they
store besides the adapted matrices, so the resolver's memory figures match the files."""
