"""`coalora-edge demo`: the whole pipeline on a model it pretrains itself."""
