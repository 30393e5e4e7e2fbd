"""OpenAI-compatible HTTP API (FastAPI): no torch imports here."""
