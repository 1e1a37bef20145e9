"""Stage 1, the model: load a Hugging Face causal LM, find the matrices to adapt, its
dimensions, a weightless skeleton, perplexity."""
