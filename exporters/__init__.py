"""Exporters: a bundle plus a resolved configuration -> files a runtime loads, verified in
that runtime. One package per artifact format (gguf/ for llama.cpp, onnx/ for ONNX
Runtime, peft/ for PyTorch with PEFT) and common/ for what they share (the export report,
perplexity in the runtime). Which exporter serves which runtime is coalora_edge.runtimes' table."""
