"""A section chosen by its ``name`` from a registry: ``dataset``, ``model`` and every ``fill``.

``{name: blur, sigma: 2}`` validates against the config class that ``blur`` registered, so a
misspelt parameter (``sigmaa``) is named with a suggestion like every other key, and a bare name
(``fill: road``) is the entry with its defaults. The registry is read when a config is
validated, not when this module is imported: an entry registered later (a plug-in, a test's
example) is valid at once.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, SerializeAsAny, ValidationError
from pydantic_core import PydanticCustomError

from roar.core.registry import Registry, closest


def registered(registry: Registry, base: type[BaseModel], default: str | None = None) -> Any:
    """The annotation of a field holding the config of one ``registry`` entry (a ``base`` subclass);
    a mapping without ``name`` is ``default``'s config when one is given."""

    def validate(value: Any) -> Any:
        if isinstance(value, base):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "entry", "expected a {kind} name or a mapping with 'name'", {"kind": registry.kind}
            )
        if "name" not in value and default is not None:
            value = {"name": default, **value}
        name = value.get("name")
        if name not in registry:
            raise PydanticCustomError(
                "unknown_name",
                "unknown {kind} '{name}'{hint}; known: {known}",
                {
                    "key": "name",
                    "kind": registry.kind,
                    "name": str(name),
                    "hint": closest(str(name), registry.names()),
                    "known": ", ".join(registry.names()),
                },
            )
        try:
            return registry.config_class(name).model_validate(value)
        except ValidationError as exc:  # the first problem, under the entry's own key
            error = exc.errors()[0]
            parts = [str(part) for part in error["loc"]]
            own_key = error.get("ctx", {}).get("key")  # our unknown-key errors name the key themselves
            if own_key and parts[-1:] != [own_key]:
                parts.append(own_key)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "required key is missing"
            raise PydanticCustomError("entry", "{message}", {"key": ".".join(parts), "message": message}) from None

    return Annotated[SerializeAsAny[base], BeforeValidator(validate)]
