"""The ``fill`` of a section: any registered fill's config, chosen by its ``name`` (``roar.config.registered``)."""

from roar.config.registered import registered
from roar.perturb.fills import FILLS, FillSection

FillConfig = registered(FILLS, FillSection)
"""``{name: blur, sigma: 2}``, or a bare name (``road``) for a fill with its defaults."""
