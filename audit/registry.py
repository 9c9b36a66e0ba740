"""One generic registry, used by every plugin family (saliency methods, region detectors, dataset readers).

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``: a plugin registers itself under a
name with a decorator, and is looked up by that name; a duplicate name raises, and an unknown name raises an
error that lists the valid ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from audit.errors import AuditError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → plugin mapping for one plugin family.

    Args:
        family: what the plugins are, used in error messages (for example ``"saliency method"``).
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; raises if the name is taken."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise AuditError(f"{self.family} {name!r} is already registered; choose another name")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The plugin registered under ``name``; the error lists the valid names."""
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.family} {name!r}; valid names: {valid}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
