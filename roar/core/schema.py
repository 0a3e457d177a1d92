"""The base of every config section: strict keys, with a suggestion when one is misspelt.

pydantic does the type and range checking; this base adds the one thing researchers hit most,
a typo in a key (``epocs``), reported with the closest valid key instead of being ignored.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from roar.core.registry import closest


class Section(BaseModel):
    """A config section: unknown keys are errors that name the key and the closest valid one."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key '{key}'{hint}",
                        {"key": str(key), "hint": closest(str(key), known)},
                    )
        return data


def format_validation_error(error: ValidationError, raw: Any) -> str:
    """One line per problem, each naming the dotted key as the user wrote it in YAML.

    Locations through a union carry the member's tag (``retrain.training.TrainingConfig.epochs``);
    the tag is not a key the user wrote, so parts that are not keys of the raw data are dropped.
    """
    lines = []
    for item in error.errors():
        parts: list[str] = []
        node = raw
        for part in item["loc"]:
            if isinstance(node, dict) and part in node:
                node = node[part]
                parts.append(str(part))
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                parts.append(f"[{part}]")
        if "key" in item.get("ctx", {}):  # our own errors name the offending key themselves
            parts.append(item["ctx"]["key"])
        key = ".".join(parts).replace(".[", "[") or "<top level>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("missing",):
            message = "required key is missing"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def dump_yaml(section: BaseModel) -> str:
    """A config (or a section) as YAML: every default spelt out, loadable again."""
    return yaml.safe_dump(section.model_dump(mode="json"), sort_keys=False)
