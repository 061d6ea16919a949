"""The package's version, in one place (read by ``pyproject.toml`` and the XRPC user agent)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
