"""GGUF for llama.cpp: architecture names, tensors, vocabulary, the export, and llama.cpp as runner."""
