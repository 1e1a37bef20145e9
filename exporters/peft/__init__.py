"""PEFT for PyTorch: a configuration's collapsed LoRA as a PEFT adapter beside the base it was trained against."""
