"""What every layer shares: errors, registries, the config base, atomic files, devices, provenance, tables, plots."""
