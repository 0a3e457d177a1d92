"""The method registry: every attribution method, by name, with its parameter schema."""

from __future__ import annotations

from roar.registry import Registry

METHODS: Registry = Registry("attribution method")


def register(cls):
    """Class decorator: ``@register`` on an ``Attribution`` subclass with ``name`` and ``config``."""
    METHODS.register(cls.name, cls.config)(cls)
    return cls
