"""One ``Registry`` type for every factory keyed by a name (optimizers, models, strategies,
data formats, engines, Tune searchers and schedulers), so each refuses an unknown name in the
same words: ``optim.name: unknown optimizer 'adamm' (allowed: ...); did you mean 'adam'?``.

A registry holds entries only; it imports nothing heavy, so the config layer and ``--help``
can list ``names()`` without building anything.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from trainers.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry for one kind of thing, chosen by one config field."""

    def __init__(self, kind: str, field: str):
        self.kind = kind  # "optimizer": what the error calls an entry
        self.field = field  # "optim.name": the config field that names an entry
        self._entries: dict[str, T] = {}
        self._usage: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, usage: str | None = None) -> Any:
        """``@reg.register("adam")`` on a function, or ``reg.register("plain", Engine)``.

        ``usage`` is how the name is written when it takes an argument (``hf:<folder>``).
        """
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._usage[name] = usage or name
            return obj

        return add if entry is None else add(entry)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary entry)."""
        self._entries.pop(name, None)
        self._usage.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def allowed(self) -> str:
        """The names as a user writes them, for messages and --help."""
        return ", ".join(self._usage.values())

    def get(self, name: str, *, shown: Any = None, field: str | None = None) -> T:
        """The entry for ``name`` or a ConfigError naming the field, the allowed names and the
        closest one. ``shown`` is the value as written when ``name`` is a part of it."""
        if name in self._entries:
            return self._entries[name]
        value = name if shown is None else shown
        raise ConfigError(f"{field or self.field}: unknown {self.kind} {value!r} "
                          f"(allowed: {self.allowed()}){did_you_mean(name, self.names())}")

    def check_params(self, name: str, params: dict[str, Any], *, field: str,
                     skip: tuple[str, ...] = ()) -> None:
        """Refuse a key of ``params`` that the entry's signature does not take (``skip``:
        the positional arguments the caller itself supplies)."""
        accepted = params_of(self.get(name), skip)
        for key in params:
            if key not in accepted:
                raise ConfigError(f"{field}.{key}: unknown parameter of {self.kind} {name!r} "
                                  f"(allowed: {', '.join(accepted) or 'none'})"
                                  f"{did_you_mean(key, accepted)}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def params_of(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The keyword parameters of ``fn`` (its ``params``), leaving out ``skip``."""
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values()
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
