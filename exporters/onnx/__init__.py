"""ONNX for ONNX Runtime: the export, MatMulNBits graph surgery, sessions, generation, onnxruntime-genai's config."""
