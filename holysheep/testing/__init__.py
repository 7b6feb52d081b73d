"""Test helpers: a local OpenAI-compatible upstream."""
