"""Checkpoints: their format, and reading them without running code from them."""
