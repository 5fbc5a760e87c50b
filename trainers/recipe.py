"""Recipes: a YAML file (safe loading, with the line of every key) plus dotted overrides
(``optim.lr=3e-4``) -> a validated ``RunConfig``, names and files checked.

Errors name the recipe file and line, or the override, that set the offending value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from trainers import io
from trainers.config import RunConfig, build_dataclass, set_dotted
from trainers.errors import ConfigError

__all__ = ["build_config", "load_config", "parse_override", "parse_yaml", "read_recipe"]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for error messages)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (list, dict)):
            raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a name, "
                              f"got {key!r}")
        if key in mapping:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return _Lines(mapping, lines)


class _Lines(dict):
    """A dict that knows the YAML line of each of its keys."""

    def __init__(self, data: dict, lines: dict):
        super().__init__(data)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(raw: Any, dotted: str) -> int | None:
    line = None
    node = raw
    for part in dotted.split("."):
        part = part.split("[")[0]
        if not isinstance(node, _Lines) or part not in node:
            break
        line = node.lines.get(part)
        node = node[part]
    return line


def parse_yaml(text: str, source: str) -> Any:
    """io.parse_yaml (safe, bounded) with the line of every key kept for messages."""
    try:
        return io.parse_yaml(text, source, loader=_LineLoader)
    except ConfigError as e:
        if str(e).startswith("line "):  # raised while building a mapping: name the file too
            raise ConfigError(f"{source}: {e}") from None
        raise


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003). Values are read as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    value = _plain(parse_yaml(text, f"override {item!r}")) if text.strip() else ""
    return key, value


def read_recipe(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The recipe's top-level mapping (keys remember their YAML lines) and its name for errors."""
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise ConfigError(f"recipe {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = parse_yaml(text, source) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping of sections "
                          f"(data, model, optim, ...), got {type(raw).__name__}")
    raw.setdefault("name", p.stem)
    return raw, source


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, *,
                 source: str = "config", line_sources: list[Any] = (),
                 check_paths: bool = True, skip_paths: tuple[str, ...] = (),
                 base: Path | None = None) -> RunConfig:
    """Apply ``key=value`` overrides to recipe data, validate, check names and files.

    ``line_sources`` are the YAML mappings the data came from, most specific first, so an
    error names the line; ``skip_paths`` are path fields not checked (outputs of earlier stages);
    ``base``: the recipe's folder, against which its own relative paths are read.
    """
    raw = _plain(raw)
    if base is not None:  # a recipe's own relative paths mean: next to the recipe
        resolve_paths(raw, base)
    given: dict[str, str] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        value = resolve_paths({key: value}, Path.cwd(), dotted=True)[key]  # the shell's folder
        set_dotted(raw, key, value, f"override {item!r}", RunConfig)
        given[key] = item
    _absolute_outputs(raw)
    try:
        cfg = build_dataclass(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(_located(str(e), given, line_sources, source)) from None
    from trainers import checks  # the registries load torch: only once a recipe is read

    try:
        checks.check_run(cfg, paths=check_paths, skip_paths=skip_paths)
    except ConfigError as e:
        raise ConfigError(_located(str(e), given, line_sources, source)) from None
    return cfg


def _path_fields() -> dict[str, tuple[str, ...]]:
    """Dotted names of the fields the config marks as paths (data.root, model.weights), with
    the words each accepts besides a path (data.unlabeled: rest)."""
    import dataclasses
    import typing

    return {f"{name}.{f.name}": f.metadata["keywords"]
            for name, section in typing.get_type_hints(RunConfig).items()
            if dataclasses.is_dataclass(section) for f in dataclasses.fields(section)
            if f.metadata.get("path")}


def _absolute(value: Any, base: Path, keywords: tuple[str, ...] = ()) -> Any:
    if (not isinstance(value, str) or not value or "://" in value or os.path.isabs(value)
            or value in keywords):
        return value
    return os.path.normpath(base / os.path.expanduser(value))


def resolve_paths(raw: dict[str, Any], base: Path, *, dotted: bool = False) -> dict[str, Any]:
    """Relative path fields of ``raw`` (sections, or dotted keys) made absolute against
    ``base``; so is the folder inside ``model.name: hf:<folder>``."""
    fields = _path_fields()
    for key in [*fields, "model.name"]:
        section, field = key.split(".")
        holder = raw if dotted else raw.get(section)
        name = key if dotted else field
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder[name]
        if key == "model.name":
            if isinstance(value, str) and value.startswith("hf:"):
                holder[name] = "hf:" + str(_absolute(value[3:], base))
        else:
            holder[name] = _absolute(value, base, fields[key])
    return raw


def _absolute_outputs(raw: dict[str, Any]) -> None:
    """Output folders stay relative to where the command runs (like any CLI's outputs), but
    the saved config names them absolutely, so it reads the same from any folder."""
    for section, key in (("train", "output_dir"), ("scaling", "storage_path")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            part[key] = _absolute(part[key], Path.cwd())
    train = raw.setdefault("train", {}) if isinstance(raw.get("train", {}), dict) else None
    if train is not None and "output_dir" not in train:
        from trainers.config import TrainConfig

        train["output_dir"] = _absolute(TrainConfig().output_dir, Path.cwd())


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                *, check_paths: bool = True) -> RunConfig:
    """Load a recipe, apply ``key=value`` overrides, validate, and return a RunConfig."""
    if path is None:
        return build_config({}, overrides, check_paths=check_paths)
    raw, source = read_recipe(path)
    if "stages" in raw:
        names = ", ".join(map(str, raw["stages"] or []))
        raise ConfigError(f"{source}: a staged recipe (stages: {names}); run it with "
                          f"`launch.py train {path}`")
    return build_config(raw, overrides, source=source, line_sources=[raw],
                        check_paths=check_paths, base=Path(path).resolve().parent)


def _located(msg: str, given: dict[str, str], line_sources: list[Any], source: str) -> str:
    """Prefix an error about field ``a.b`` with the override or the recipe line that set it."""
    dotted = msg.split(":", 1)[0].split("=", 1)[0]
    key = next((k for k in given if dotted == k or dotted.startswith(k + ".")), None)
    if key is not None:  # the value came from the command line, not the file
        return f"override {given[key]!r}: {msg}"
    line = next((n for n in (_line_of(src, dotted) for src in line_sources) if n), None)
    return f"{source} line {line}: {msg}" if line else f"{source}: {msg}"


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x
