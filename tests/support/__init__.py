"""Test helpers: tiny random models, adapter writers, an engine harness."""
