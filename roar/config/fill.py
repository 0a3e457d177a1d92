"""The ``fill`` of a section: the config of a registered fill, chosen by its ``name``.

``{name: blur, sigma: 2}`` validates against ``roar.perturb.fills``' ``BlurFillConfig``, so a
misspelt parameter (``sigmaa``) is named with a suggestion like every other key; a bare name
(``fill: road``) is the fill with its defaults. The registry is looked up when a config is
validated, not when this module is imported: a fill registered later is valid at once.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SerializeAsAny, ValidationError
from pydantic_core import PydanticCustomError

from roar.core.registry import closest
from roar.perturb.fills import FILLS, FillSection


def _fill_config(value: Any) -> Any:
    if isinstance(value, FillSection):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise PydanticCustomError("fill", "expected a fill name or a mapping with 'name' and its parameters")
    name = value.get("name")
    if name not in FILLS:
        raise PydanticCustomError(
            "unknown_name",
            "unknown fill '{name}'{hint}; known: {known}",
            {"name": str(name), "hint": closest(str(name), FILLS.names()), "known": ", ".join(FILLS.names())},
        )
    try:
        return FILLS.config_class(name).model_validate(value)
    except ValidationError as exc:  # the first problem, under the fill's own key
        error = exc.errors()[0]
        parts = [str(part) for part in error["loc"]]
        own_key = error.get("ctx", {}).get("key")  # our unknown-key errors name the key themselves
        if own_key and parts[-1:] != [own_key]:
            parts.append(own_key)
        key, message = ".".join(parts), error["msg"].removeprefix("Value error, ")
        raise PydanticCustomError("fill", "{message}", {"key": key, "message": message}) from None


FillConfig = Annotated[SerializeAsAny[FillSection], BeforeValidator(_fill_config)]
"""A section's ``fill`` field: any registered fill's config (serialised with all of its fields)."""
