"""Generation from trained models: sampling with a KV cache."""
