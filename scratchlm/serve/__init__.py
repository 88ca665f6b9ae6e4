"""The OpenAI-compatible server and its chat page."""
