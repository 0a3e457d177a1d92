"""Worked examples of extending roar, each a complete file: docs/architecture.md quotes them."""
