"""A name -> class registry, shared by mechanisms and accountants."""

from __future__ import annotations

from typing import Generic, TypeVar

from dpfa.errors import UnknownNameError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Maps ``cls.name`` to ``cls`` for subclasses of ``base``."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._classes: dict[str, T] = {}

    def register(self, cls: T, *, overwrite: bool = False) -> T:
        """Add ``cls`` under ``cls.name``; usable as a class decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register() expects a subclass of {self.base.__name__}, got {cls!r}.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute `name` (a non-empty str) to be registered.")
        if name in self._classes and self._classes[name] is not cls and not overwrite:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered ({self._classes[name].__qualname__}); "
                "pass overwrite=True to replace it."
            )
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> T:
        """The class registered under ``name``."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}; known: {', '.join(self.names())}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
