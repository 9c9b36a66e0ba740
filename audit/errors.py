"""The error hierarchy: every error a user can cause derives from :class:`AuditError`.

Messages say what was expected, what was found, and how to fix it, so that the command line can print them
as they are, without a traceback.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error the audit raises on purpose."""


class ConfigError(AuditError, ValueError):
    """The configuration (file, command line or flow parameters) is invalid."""


class DataError(AuditError, ValueError):
    """The dataset as a whole cannot be audited (missing path, empty dataset, bad manifest)."""


class DecodeError(AuditError, ValueError):
    """One input file cannot be read as an image; it is recorded in ``errors`` and the audit goes on."""


class ModelError(AuditError, ValueError):
    """The model file, its architecture or its target layer does not fit."""


class ShapeError(AuditError, ValueError):
    """A tensor given to a public function has the wrong shape, dtype or device."""

    def __init__(self, name: str, expected: str, found: object) -> None:
        super().__init__(f"{name}: expected shape {expected}, found {found}")
        self.name = name
        self.expected = expected
        self.found = found


class UnknownNameError(AuditError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would otherwise print the message inside quotes
        return str(self.args[0]) if self.args else ""


class QueryError(AuditError, ValueError):
    """A user's SQL query is not allowed (not read-only) or failed."""
