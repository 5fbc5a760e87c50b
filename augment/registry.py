"""Policy registry: a policy is one function registered under a name for one modality.

The function takes ``strength`` (the single [0, 1] intensity knob Ray Tune searches) plus its
own keyword parameters, and returns a callable policy object. Its signature *is* the list of
allowed parameters, so a misspelt ``augment.params`` key is caught with the valid names listed.
This module imports nothing heavy: the built-in policies load on the first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODALITIES = ("image", "text")
_BUILTIN_MODULES = ("augment.image", "augment.text")


class AugmentError(ValueError):
    """A policy name, strength or parameter is invalid; ``field`` names it as in AugmentConfig."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PolicySpec:
    name: str
    modality: str
    factory: Callable[..., Any]
    params: tuple[str, ...]  # keyword parameters besides strength

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.factory) or "").split("\n")[0]


_REGISTRY: dict[tuple[str, str], PolicySpec] = {}
_loaded = False


def register(name: str, *, modality: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register("classic", modality="image")`` on ``fn(*, strength, **params)``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: expected one of {MODALITIES}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        if "strength" not in sig.parameters:
            raise TypeError(f"policy {name!r}: its function must take a 'strength' keyword")
        params = tuple(p for p in sig.parameters if p != "strength")
        key = (modality, name)
        if key in _REGISTRY and _REGISTRY[key].factory is not fn:
            raise ValueError(f"{modality} policy {name!r} is registered twice")
        _REGISTRY[key] = PolicySpec(name, modality, fn, params)
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def available(modality: str) -> list[str]:
    """Names of the policies registered for ``modality``."""
    _load_builtins()
    return sorted(n for (m, n) in _REGISTRY if m == modality)


def policy_spec(name: str, modality: str) -> PolicySpec:
    _load_builtins()
    if modality not in MODALITIES:
        raise AugmentError("modality", f"{modality!r} is not one of {', '.join(MODALITIES)}")
    spec = _REGISTRY.get((modality, name))
    if spec is None:
        allowed = available(modality)
        other = [m for m in MODALITIES if (m, name) in _REGISTRY]
        why = f"is for {other[0]} data" if other else "is unknown"
        hint = difflib.get_close_matches(name, allowed, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise AugmentError("policy", f"{name!r} {why} (allowed for {modality}: "
                           f"{', '.join(allowed)}){extra}")
    return spec


def create_augment(name: str, *, modality: str, strength: float = 0.5, **params: Any) -> Any:
    """Build the registered policy ``name`` for ``modality`` at ``strength`` in [0, 1]."""
    spec = policy_spec(name, modality)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0.0 <= strength <= 1.0:
        raise AugmentError("strength", f"expected a number in [0, 1], got {strength!r}")
    for key in params:
        if key not in spec.params:
            hint = difflib.get_close_matches(key, spec.params, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            allowed = ", ".join(spec.params) or "none"
            raise AugmentError(f"params.{key}", f"unknown parameter of policy {name!r} "
                               f"(allowed: {allowed}){extra}")
    return spec.factory(strength=float(strength), **params)


# ----------------------------------------------------------------------------------------------
# Parameter checks shared by the policy functions: each names the parameter it rejects.


def number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise AugmentError(f"params.{name}", f"expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise AugmentError(f"params.{name}", f"expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise AugmentError(f"params.{name}", f"expected true/false, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise AugmentError(f"params.{name}", f"{value!r} is not one of {', '.join(allowed)}")
    return value
