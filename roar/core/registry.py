"""Name → factory registries shared by datasets, models and (later) methods and metrics.

One registry per concept lets the CLI, the YAML schema and the tests read the same list of
names: a new entry is configurable and tested the moment it is registered.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from roar.core.errors import RoarError

T = TypeVar("T")


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean 'x'?)' suffix for an unknown name, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Generic[T]):
    """Maps a name to a factory and the pydantic config class that parametrises it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, config: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@DATASETS.register("shapes", ShapesConfig)``."""

        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            self._configs[name] = config
            return factory

        return wrap

    def unregister(self, name: str) -> None:
        """Remove an entry (a test that registers an example entry takes it out again)."""
        self._check(name)
        del self._factories[name], self._configs[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def config_class(self, name: str) -> type:
        self._check(name)
        return self._configs[name]

    def configs(self) -> list[type]:
        return [self._configs[n] for n in self.names()]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        self._check(name)
        return self._factories[name](*args, **kwargs)

    def _check(self, name: str) -> None:
        if name not in self._factories:
            raise RoarError(
                f"unknown {self.kind} '{name}'{closest(name, self.names())}; known: {', '.join(self.names())}"
            )

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def import_object(path: str, what: str = "plug-in") -> Any:
    """The object named by a dotted path (``package.module.function``, also ``module.Class.method``):
    how users plug in their own method, fill or inpainter. Every failure is a one-line RoarError
    starting with ``what`` and the path."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise RoarError(f"{what} '{path}': expected a dotted path such as 'package.module.function'")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only "this prefix is no module" means: try a shorter one. A module that exists but
            # fails to import its own dependencies is reported as that.
            if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue
            raise RoarError(f"{what} '{path}': importing {module_name} failed: {error}") from error
        except Exception as error:
            raise RoarError(f"{what} '{path}': importing {module_name} failed: {error}") from error
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                public = [name for name in dir(obj) if not name.startswith("_")]
                raise RoarError(
                    f"{what} '{path}': {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no "
                    f"'{attribute}'{closest(attribute, public)}"
                )
            obj = getattr(obj, attribute)
        return obj
    raise RoarError(f"{what} '{path}': no module '{parts[0]}' can be imported")
