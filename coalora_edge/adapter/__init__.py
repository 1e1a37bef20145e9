"""Stage 3, the adapter: CoA-LoRA's adapted layer, the wrapped model, the configuration model, the methods."""
