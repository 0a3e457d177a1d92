"""The method registry: every attribution method, by name, with its parameter schema.

``register`` also checks what a class declares about itself (``needs``, ``smoothable``), so a
method that asks for data the extraction stage cannot supply fails when it is registered, not
halfway through an extraction, and keeps the class, so that a noise tunnel can ask whether a
method may be its base without building it.
"""

from __future__ import annotations

from roar.attribution.base import NEEDS
from roar.core.registry import Registry

METHODS: Registry = Registry("attribution method")

_CLASSES: dict[str, type] = {}


def register(cls):
    """Class decorator: ``@register`` on an ``Attribution`` subclass with ``name`` and ``config``."""
    needs = cls.needs
    if not isinstance(needs, frozenset) or not needs <= set(NEEDS):
        raise ValueError(f"method '{cls.name}': needs must be a frozenset of {', '.join(sorted(NEEDS))}, got {needs!r}")
    if cls.smoothable and needs:
        raise ValueError(
            f"method '{cls.name}' is smoothable but needs {', '.join(sorted(needs))}: the noisy copies of a "
            "noise tunnel carry no context"
        )
    METHODS.register(cls.name, cls.config)(cls)
    _CLASSES[cls.name] = cls
    return cls


def method_class(name: str) -> type | None:
    """The class registered under ``name`` with ``register``, or None."""
    return _CLASSES.get(name) if name in METHODS else None


def smoothable_methods() -> list[str]:
    """The registered methods a noise tunnel may wrap, sorted."""
    return [name for name in METHODS.names() if getattr(method_class(name), "smoothable", False)]
