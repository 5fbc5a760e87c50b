"""One ``Registry`` type for every factory keyed by a name (optimizers, models, strategies,
data formats, engines, Tune searchers and schedulers), so each refuses an unknown name in the
same words: ``optim.name: unknown optimizer 'adamm' (allowed: ...); did you mean 'adam'?``.

A registry holds entries only; it imports nothing heavy, so the config layer and ``--help``
can list ``names()`` without building anything.
"""

from __future__ import annotations

import inspect
import typing
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
        self._ranges: dict[str, dict[str, tuple[float | None, float | None]]] = {}

    def register(self, name: str, entry: T | None = None, *, usage: str | None = None,
                 ranges: dict[str, tuple[float | None, float | None]] | None = None) -> Any:
        """``@reg.register("adam")`` on a function, or ``reg.register("plain", Engine)``.

        ``usage`` is how the name is written when it takes an argument (``hf:<folder>``);
        ``ranges`` bounds numeric keyword parameters (inclusive, None = open).
        """
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._usage[name] = usage or name
            self._ranges[name] = dict(ranges or {})
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

    def check_params(self, name: str, params: Any, *, field: str,
                     skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """``params`` checked against the entry's keyword parameters: names, annotated types
        (int, float, bool, str) and registered ranges; returns them converted. ``skip``: the
        arguments the caller itself supplies."""
        if not isinstance(params, dict):
            raise ConfigError(f"{field}: expected a mapping of parameters, got {params!r}")
        fn = self.get(name)
        accepted = params_of(fn, skip)
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
        out = {}
        for key, value in params.items():
            where = f"{field}.{key}"
            if key not in accepted:
                raise ConfigError(f"{where}: unknown parameter of {self.kind} {name!r} "
                                  f"(allowed: {', '.join(accepted) or 'none'})"
                                  f"{did_you_mean(key, accepted)}")
            out[key] = _typed(value, hints.get(key), where)
            lo, hi = self._ranges.get(name, {}).get(key, (None, None))
            if out[key] is not None and ((lo is not None and out[key] < lo)
                                         or (hi is not None and out[key] > hi)):
                raise ConfigError(f"{where}: {out[key]} is out of range (allowed "
                                  f"[{'-inf' if lo is None else lo}, "
                                  f"{'inf' if hi is None else hi}])")
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _typed(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the parameter's annotated scalar type, or a ConfigError naming ``where``.
    ``T | None`` takes None (the entry's own default) or a T."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _typed(value, inner, where)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        value = int(value) if isinstance(value, float) and value.is_integer() else value
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed (allowed: "
                              f"{', '.join(map(str, allowed))}){did_you_mean(str(value), list(map(str, allowed)))}")
        return value
    else:
        return value  # unannotated or a richer type: the callee checks it
    if not ok:
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def params_of(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The keyword parameters of ``fn`` (its ``params``), leaving out ``skip``."""
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values()
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
