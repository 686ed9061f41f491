"""Registries of model-specific knowledge, keyed by mmdet3d class name.

Lookups walk the class's MRO, so an entry for `Anchor3DHead` also covers its subclasses
unless a subclass has an entry of its own. The pipeline never branches on model names:
everything model-specific is an entry in one of these registries.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class ClassRegistry(Generic[T]):
    """Maps class names to entries; `lookup` resolves through the MRO of an object or class."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, class_name: str, entry: T) -> T:
        if class_name in self._entries:
            raise ValueError(f"{self.what}: duplicate entry for {class_name}")
        self._entries[class_name] = entry
        return entry

    def decorator(self, *class_names: str) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            for name in class_names:
                self.register(name, entry)
            return entry

        return wrap

    def lookup(self, obj_or_cls: object) -> tuple[str, T] | None:
        """(matched class name, entry) for the nearest class in the MRO, or None."""
        cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
        for klass in cls.__mro__:
            if klass.__name__ in self._entries:
                return klass.__name__, self._entries[klass.__name__]
        return None

    def get(self, class_name: str) -> T | None:
        return self._entries.get(class_name)

    def __contains__(self, class_name: str) -> bool:
        return class_name in self._entries

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())
