"""What every stage returns: its numbers by name, and the one line the CLI prints."""

from __future__ import annotations

from typing import Any


class StageResult(dict):
    """A stage's summary as a mapping (``result["seconds"]``), with ``summary()``: the line ``roar`` prints."""

    def __init__(self, values: dict[str, Any], line: str):
        super().__init__(values)
        self.line = line

    def summary(self) -> str:
        return self.line
