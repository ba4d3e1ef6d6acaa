"""YAML modelfiles and name resolution."""
