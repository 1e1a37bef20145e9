"""What every exporter shares: the export report and its checks, perplexity in the runtime."""
