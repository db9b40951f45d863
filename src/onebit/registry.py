"""A name → factory registry, the one lookup used for models, datasets, quantizers, losses.

Registering is a decorator on a plain function (timm's pattern)::

    MODELS = Registry("model")

    @MODELS.register
    def binarynet_mlp(...): ...

    MODELS.create("binarynet_mlp", width=0.5)

An unknown name raises :class:`onebit.errors.UnknownNameError` listing the valid names.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterator


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, fn: Callable | None = None, *, name: str | None = None):
        def add(f: Callable) -> Callable:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = f
            return f

        return add(fn) if fn is not None else add

    def get(self, name: str) -> Callable:
        from .errors import UnknownNameError

        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def create(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)

    def describe(self, name: str) -> str:
        """The first line of the entry's docstring, for listings."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
