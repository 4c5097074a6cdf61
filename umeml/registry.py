"""Registries by name (timm style): one name, one entry; a duplicate name is an error.

Configurations choose code by a registered name, never by a dotted import path. The models
(:mod:`umeml.model.registry`), the privacy accountants (:mod:`umeml.federation.accountants`)
and the federation strategies (``umeml.server.strategies``) each keep one :class:`Registry`.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from umeml.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` (``"model"``, ``"accountant"``, ...) by name.

    Register with the :meth:`register` decorator; look an entry up with ``registry[name]``
    (a programming error when missing: ``KeyError``) or :meth:`get` (user input: a
    :class:`~umeml.errors.ConfigError` naming the config key and the available names).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name``.

        Raises ``ValueError`` when ``name`` is empty or already taken: two entries must never
        share a name, or a config (or a saved run) would silently pick one of them.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})")
            self._entries[name] = entry
            return entry

        return decorator

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._entries))

    def get(self, name: str, key: str) -> T:
        """The entry ``name``, chosen by the config key ``key`` (e.g. ``model.name``)."""
        if name not in self._entries:
            raise ConfigError(f"{key}: unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
