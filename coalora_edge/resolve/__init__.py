"""Stage 7, resolving: a device profile and a bundle -> the configuration that fits, with its memory."""
