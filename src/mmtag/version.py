"""The package version, in a module of its own so that any layer (the CLI's `--version`, the
train log's first line) can read it without importing the package's public API."""
__version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_structure.py checks)
