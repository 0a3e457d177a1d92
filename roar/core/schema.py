"""The base of every config section: strict keys, with a suggestion when one is misspelt.

pydantic does the type and range checking; this base adds the one thing researchers hit most,
a typo in a key (``epocs``), reported with the closest valid key instead of being ignored.
YAML is read by ``load_yaml`` (safe loading that refuses a key given twice) and written by
``dump_yaml``. ``registered(registry, base)`` is the annotation of a section chosen by its ``name``
from a registry (``dataset``, ``model``, every ``fill``, a method's fill or inpainter):
``{name: blur, sigma: 2}`` validates against the config class that ``blur`` registered, so a
misspelt parameter (``sigmaa``) is named with a suggestion like every other key, and a bare name
(``fill: road``) is the entry with its defaults. The registry is read when a config is
validated, not when this module is imported: an entry registered later (a plug-in, a test's
example) is valid at once.
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SerializeAsAny,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from roar.core.registry import Registry, closest

SEED_LIMIT = 2**32
"""Seeds are integers in [0, 2**32): what every consumer accepts. scikit-learn's ``random_state`` (the
``digits`` split, the VoG toy's blobs) takes nothing larger, and numpy and torch take any of them;
torch's generators are also seeded with ``seed * 100_003 + epoch``, which stays far below 2**63."""


SEED_RANGE = f"an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)"


def check_seed(value: int) -> int:
    """``value`` if it is a valid seed, else a validation error that states the range."""
    if not 0 <= value < SEED_LIMIT:
        raise PydanticCustomError("seed_range", f"a seed must be {SEED_RANGE}, got {{value}}", {"value": value})
    return value


Seed = Annotated[int, AfterValidator(check_seed)]
"""The type of every seed in the config: an integer in [0, 2**32)."""


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


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives one key twice: ``key`` is its dotted path, ``lines`` the two (1-based) lines."""

    def __init__(self, key: str, lines: tuple[int, int], mark):
        self.key, self.lines = key, lines
        where = f"lines {lines[0]} and {lines[1]}" if lines[0] != lines[1] else f"twice on line {lines[0]}"
        super().__init__(None, None, f"duplicate key '{key}' ({where})", mark)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth.

    Plain safe loading keeps the last value and drops the first without a word, so a key set twice
    in a long config silently means one of them. A key that overrides one merged in by ``<<`` is
    not a duplicate.
    """

    def construct_document(self, node):
        self._document = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first is not key_node:
                    dotted = "".join([*(_path_to(self._document, node) or []), f".{key}"]).removeprefix(".")
                    lines = (first.start_mark.line + 1, key_node.start_mark.line + 1)
                    raise DuplicateKeyError(dotted, lines, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _path_to(root: yaml.Node, target: yaml.Node, seen: set[int] | None = None) -> list[str] | None:
    """The steps (``.key``, ``[i]``) from the document ``root`` down to the node ``target``."""
    if root is target:
        return []
    seen = set() if seen is None else seen
    if id(root) in seen:  # aliases can make the node graph cyclic
        return None
    seen.add(id(root))
    if isinstance(root, yaml.MappingNode):
        children = [(f".{key.value if isinstance(key, yaml.ScalarNode) else '?'}", child) for key, child in root.value]
    elif isinstance(root, yaml.SequenceNode):
        children = [(f"[{i}]", child) for i, child in enumerate(root.value)]
    else:
        children = []
    for step, child in children:
        below = _path_to(child, target, seen)
        if below is not None:
            return [step, *below]
    return None


def load_yaml(stream: str | bytes):
    """YAML text (bytes are decoded as YAML says: UTF-8, or UTF-16/32 with a byte-order mark) as Python
    data, by safe loading; a key given twice in a mapping is a ``DuplicateKeyError``."""
    return yaml.load(stream, Loader=UniqueKeyLoader)  # a SafeLoader: no Python objects are built


def dump_yaml(section: BaseModel) -> str:
    """A config (or a section) as YAML: every default spelt out, loadable again."""
    return yaml.safe_dump(section.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------ registry-chosen sections


def registered(registry: Registry, base: type[BaseModel], default: str | None = None) -> Any:
    """The annotation of a field holding the config of one ``registry`` entry (a ``base`` subclass),
    chosen by its ``name``; a mapping without ``name`` is ``default``'s config when one is given."""

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
