"""coalora-edge: fine-tune a quantized LLM once (CoA-LoRA), run it on every device."""

__version__ = "0.1.0"
