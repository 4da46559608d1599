"""The package version (its own module, so that low layers need not import the package root, which is
the lazy public API)."""

__version__ = "0.1.0"
