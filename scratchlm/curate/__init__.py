"""Raw text to clean, deduplicated documents."""
