"""shortcut-audit: find shortcut learning in image datasets and models."""

__version__ = "0.3.0"
