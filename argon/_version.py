"""The package version, kept apart so every module can import it without cycles."""

__version__ = "0.2.0.dev0"
