"""Registries: a name -> implementation mapping filled by decorators, with one-line errors for
unknown names. Adapters, merge methods and continual methods each keep one."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from lorabench.errors import choice_error

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``{name: implementation}``. ``what`` names the kind in errors ("adapter"), ``field`` is the
    config key that picks one (``adapter.name``)."""

    def __init__(self, what: str, field: str):
        super().__init__()
        self.what, self.field = what, field

    def add(self, name: str, value: T) -> T:
        """Register ``value`` under ``name``; a name registered twice is a programming error."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self[name] = value
        return value

    def register(self, name: str, on_register: Callable[[T, str], None] | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; ``on_register(obj, name)`` runs first (e.g. to set a class's name)."""

        def deco(obj: T) -> T:
            if on_register is not None:
                on_register(obj, name)
            return self.add(name, obj)

        return deco

    def lookup(self, name: str) -> T:
        """The implementation registered as ``name``, or a ConfigError listing the valid names."""
        if name not in self:
            raise choice_error(self.field, name, self)
        return self[name]
