"""The toolkit's version: one place, read by pyproject.toml and every file the toolkit writes."""

__version__ = "0.1.0"
