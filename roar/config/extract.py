"""The ``attribution`` section of ``roar extract``: which maps to compute, for which splits, and how to store them.

Method entries are parsed once, into ``MethodEntry`` objects, when the config is validated: the
method exists, its parameters are valid, names are unique. Written back (``roar config``, a run's
``config.yaml``) an entry takes the short form it was given in.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from roar.attribution import METHODS, create
from roar.core.errors import RoarError
from roar.core.registry import closest
from roar.core.schema import Section

DEFAULT_METHODS = [
    "gradient",
    "grad_x_input",
    "integrated_gradients",
    "guided_backprop",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "gradcam",
    "random",
    "sobel",
]


class MethodEntry(Section):
    """One map to extract: ``name`` in the store, the ``method`` computing it, its parameters.

    In YAML an entry is a method name (``vargrad``), or a mapping with ``name`` and the method's
    parameters (``{name: integrated_gradients, steps: 32}``); ``method`` renames
    (``{name: ig_white, method: integrated_gradients, baseline: white}``); a dotted ``method`` is
    a plug-in function called with ``kwargs`` (``{name: mine, method: pkg.mod.fn, kwargs: {...}}``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_plugin(self) -> bool:
        return "." in self.method

    @model_serializer
    def _short_form(self) -> str | dict[str, Any]:
        """The entry as it is written in YAML (loadable again): a bare name when that is all it is."""
        if self.method == self.name and not self.params:
            return self.name
        head = {"name": self.name} if self.method == self.name else {"name": self.name, "method": self.method}
        return {**head, **self.params}


def _method_entry(index: int, raw: Any) -> MethodEntry:
    if isinstance(raw, MethodEntry):
        return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"[{index}]: expected a method name or a mapping with 'name'")
    params = {k: v for k, v in raw.items() if k not in ("name", "method")}
    method = str(raw.get("method", raw["name"]))
    if "." in method:
        unknown = set(params) - {"kwargs"}
        if unknown:
            raise ValueError(
                f"[{index}] {raw['name']}: a plug-in takes only 'kwargs', not {', '.join(sorted(unknown))}"
            )
    else:
        if method not in METHODS:
            hint = closest(method, METHODS.names())
            raise ValueError(f"[{index}]: unknown attribution method '{method}'{hint}")
        try:
            create(method, **params)
        except RoarError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    return MethodEntry(name=str(raw["name"]), method=method, params=params)


class AttributionConfig(Section):
    """``roar extract``: which maps to compute for which splits, and how to store them."""

    methods: list[MethodEntry] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    splits: list[Literal["train", "test"]] | dict[Literal["train", "test"], list[str] | Literal["all"]] = Field(
        default_factory=lambda: ["train", "test"],
        description="splits to extract every method for, or a mapping split -> the method names to extract "
        "for it ('all': every method), e.g. {test: all, train: [gradient, random]} when only the curves "
        "(test split) need every method and ROAR/KAR (both splits) only some",
    )
    target: Literal["predicted", "label"] = Field("predicted", description="class whose logit is attributed")
    reduction: Literal["sum_squares", "sum_abs", "max_abs", "none"] = "sum_squares"
    batch_size: int = Field(128, ge=1, description="images per extraction batch")
    max_batch: int | None = Field(
        None, ge=1, description="inputs per forward/backward pass (memory budget); default 64 on CPU, 1024 on GPU"
    )
    references: int = Field(256, ge=1, description="training images drawn as expected-gradients baselines")
    compression: Literal["lzf", "gzip", "none"] = "lzf"
    amp: bool = Field(False, description="bf16 autocast on CUDA while attributing")
    num_workers: int = Field(2, ge=0, description="loader workers for datasets read from disk")

    @field_validator("methods", mode="before")
    @classmethod
    def _parse_methods(cls, methods: Any) -> list[MethodEntry]:
        if not isinstance(methods, list):
            raise ValueError("expected a list of method names or mappings with 'name'")
        entries = [_method_entry(i, raw) for i, raw in enumerate(methods)]
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; repeated: {', '.join(duplicates)}")
        return entries

    @model_validator(mode="after")
    def _split_methods_exist(self) -> AttributionConfig:
        if isinstance(self.splits, dict):
            names = [e.name for e in self.entries()]
            for split, chosen in self.splits.items():
                unknown = [m for m in (names if chosen == "all" else chosen) if m not in names]
                if unknown:
                    raise PydanticCustomError(
                        "unknown_name",
                        "{unknown} not among the methods{hint}; the methods are {names}",
                        {
                            "key": f"splits.{split}",
                            "unknown": ", ".join(unknown),
                            "hint": closest(unknown[0], names),
                            "names": ", ".join(names),
                        },
                    )
        return self

    def entries(self, split: str | None = None) -> list[MethodEntry]:
        """The method entries, all of them or those extracted for ``split``."""
        entries = list(self.methods)
        chosen = self.splits.get(split, []) if isinstance(self.splits, dict) and split else "all"
        return entries if chosen == "all" else [e for e in entries if e.name in chosen]

    def split_names(self) -> list[str]:
        return list(self.splits)
