"""What a store was made from, and the one-line refusal when a run asks for something else.

A store is only ever resumed, extended or read by a run with the same inputs, because chunks
computed from different inputs would otherwise mix silently in one file. Two levels are checked:

* **The store**: the fields every store has (split, size, geometry, dataset and its fingerprint,
  model hash, channels) plus the caller's store-wide identity, a plain dict whose keys the store
  does not interpret (the attribution stage gives its reduction and target). Both sides' keys are
  compared, so a key that only one side has is a difference too.
* **Each array set** ("method"): the caller's dict for that set (an attribution method's
  ``{"method", "params"}``, a VoG snapshot's ``{"epoch", "step"}``), compared the same way; a
  dict-valued key is compared one level down so the message names the parameter that differs.

The messages name the first difference and the way out, in the order the fields are listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roar.core.errors import RoarError
from roar.store.format import FIELDS, NAME, RESERVED, geometry_text, normalise, short, store_identity, value_text

_UNSET = object()


def check_store(where: Path, stored: dict, new: dict) -> None:
    """RoarError naming the first field in which an existing store (header or manifest) differs from this run."""
    old_identity, new_identity = store_identity(stored), store_identity(new)
    keys = [*FIELDS, *_keys(new_identity, old_identity), "channels"]
    for key in keys:
        if key in FIELDS or key == "channels":
            old, cur = stored.get(key), new[key]
        else:
            old, cur = old_identity.get(key, _UNSET), new_identity.get(key, _UNSET)
        if _differ(old, cur):
            raise RoarError(f"{where} {_mismatch(key, old, cur)}; delete it or use another output_dir")


def check_set(where: Path, name: str, stored: dict, new: dict) -> None:
    """RoarError naming the array set and the first key (or parameter) in which its identity differs."""
    stored, new = normalise(stored), normalise(new)
    for key in _keys(new, stored):
        old, cur = stored.get(key, _UNSET), new.get(key, _UNSET)
        if not _differ(old, cur):
            continue
        if key == "method":
            raise RoarError(
                f"{where}: method '{name}' was computed by '{_text(old)}', this run asks for '{_text(cur)}'; "
                "delete it or store the new method under another name"
            )
        if isinstance(old, dict) and isinstance(cur, dict):
            key, old, cur = next(
                (k, old.get(k, _UNSET), cur.get(k, _UNSET))
                for k in _keys(cur, old)
                if _differ(old.get(k, _UNSET), cur.get(k, _UNSET))
            )
        raise RoarError(
            f"{where}: method '{name}' was computed with {key}={_repr(old)}, this run asks for {key}={_repr(cur)}; "
            "delete it or store the new setting under another method name"
        )


def check_names(sets: dict[str, dict]) -> None:
    """Array set names usable as HDF5 and file names; identities that are dicts without reserved keys."""
    for name, identity in sets.items():
        if not NAME.match(name):
            raise RoarError(f"stored method name '{name}' must use only letters, digits and _ . + -")
        if not isinstance(identity, dict):
            raise ValueError(f"methods['{name}'] must be a dict: the identity of what is stored under that name")
        reserved = [key for key in RESERVED if key in identity]
        if reserved:
            raise ValueError(f"methods['{name}'] uses the reserved key(s) {', '.join(reserved)}")


def check_identity(identity: dict) -> None:
    if not isinstance(identity, dict) or not all(isinstance(key, str) for key in identity):
        raise ValueError(f"identity must be a dict with string keys, got {identity!r}")


# ------------------------------------------------------------------------------------------- messages


def _keys(first: dict, second: dict) -> list[str]:
    """Sorted keys of both dicts (sorted, since stored identities come back from JSON with sorted keys)."""
    return sorted(set(first) | set(second))


def _differ(old: Any, new: Any) -> bool:
    if old is _UNSET or new is _UNSET:
        return old is not new
    return normalise(old) != normalise(new)


def _text(value: Any) -> str:
    return "<unset>" if value is _UNSET else value_text(value)


def _repr(value: Any) -> str:
    return "<unset>" if value is _UNSET else repr(normalise(value))


def _mismatch(key: str, old: Any, new: Any) -> str:
    if key == "n":
        return f"was made for {old} images, this dataset split has {new}"
    if key == "geometry":
        return f"was made for geometry {geometry_text(old)}, this dataset is {geometry_text(new)}"
    if key == "dataset_fingerprint":
        return f"was made for dataset fingerprint {short(old)}, this dataset is {short(new)}"
    if key == "model_hash":
        return f"was made with model {short(old)}, this model is {short(new)}"
    if key == "channels":
        kept = {True: "channels kept", False: "channels reduced"}
        return f"was made with {kept[bool(old)]}, this run asks for {kept[bool(new)]}"
    words = key.replace("_", " ")
    if old is _UNSET:
        return f"was made without {words}, this run asks for {words} '{value_text(new)}'"
    if new is _UNSET:
        return f"was made for {words} '{value_text(old)}', this run does not set it"
    return f"was made for {words} '{value_text(old)}', this run asks for '{value_text(new)}'"
