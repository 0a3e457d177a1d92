"""What a rerun reuses and what it recomputes, and the words for why.

Every result a stage keeps between runs (a ROAR/KAR row, a method's perturbation curve) records the
inputs it was computed from, as a nested dict: the content digest of the maps it read (``maps``),
the model (``model`` or ``base_model``: a checkpoint hash), the dataset's fingerprint and the
settings that shape it. A rerun computes the same dict for the same result and reuses the old one
only if nothing differs; otherwise the result is recomputed and the stage's summary line says how
many and why ("2 of 6 recomputed: maps of random changed").
"""

from __future__ import annotations

from roar.core.provenance import changed_keys

MAP_KEYS = ("maps",)
MODEL_KEYS = ("model_hash", "base_model")


class Reuse:
    """The staleness check of one stage run: ``fresh(...)`` per cached result, ``note(total)`` for the summary."""

    def __init__(self) -> None:
        self.reasons: dict[str, list[str]] = {}  # reason kind -> details, in order of first appearance
        self.recomputed = 0

    def fresh(self, method: str | None, recorded: dict | None, current: dict) -> bool:
        """Whether a result recorded with inputs ``recorded`` (None: not recorded) may be reused for
        inputs ``current``; a stale one is counted, with the reason, for the summary line."""
        if recorded is not None and recorded == current:
            return True
        self.stale(method, None if recorded is None else changed_keys(recorded, current))
        return False

    def stale(self, method: str | None, keys: list[str] | None) -> None:
        """Count one result to recompute; ``keys``: the dotted input keys that changed (None: unknown)."""
        self.recomputed += 1
        if keys is None:
            self._add("inputs not recorded", "")
            return
        for key in keys:
            top = key.split(".")[0]
            if top in MAP_KEYS:
                self._add("maps", method or "?")
            elif top in MODEL_KEYS:
                self._add("model", "")
            else:
                self._add("settings", key)

    def _add(self, kind: str, detail: str) -> None:
        details = self.reasons.setdefault(kind, [])
        if detail and detail not in details:
            details.append(detail)

    def why(self) -> str:
        """The reasons, e.g. ``maps of random, grad changed; settings changed: retrain.fill``."""
        words = []
        for kind, details in self.reasons.items():
            if kind == "maps":
                words.append(f"maps of {', '.join(details)} changed")
            elif kind == "model":
                words.append("the trained model changed")
            elif kind == "settings":
                words.append(f"settings changed: {', '.join(details)}")
            else:
                words.append(kind)
        return "; ".join(words)

    def note(self, total: int) -> str:
        """``"2 of 6 recomputed: maps of random changed"``, or '' when nothing was stale."""
        return f"{self.recomputed} of {total} recomputed: {self.why()}" if self.recomputed else ""
