"""Stage 6, the bundle: the trained artifact written, loaded and verified; lookups, restore, summary."""
