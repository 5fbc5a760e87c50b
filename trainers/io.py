"""Files written whole or not at all, and loads that never construct objects.

Every record smallshot writes (configs, results, progress, pointers, trial records) goes
through ``write_text``: a temporary file beside the target, then ``os.replace``, so a crash
leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from trainers.errors import ConfigError


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (tmp + rename); create the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def cache_root() -> Path:
    """smallshot's folder for what outlives a run (assembled weights, the kept Ray record)."""
    return Path(os.environ.get("SMALLSHOT_CACHE") or Path.home() / ".cache" / "smallshot")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as JSON, atomically; values JSON cannot hold are written as their str()."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Rows of a JSON-lines file; a last line cut short by a crash ends the list."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


# Bounds on any YAML smallshot reads (recipes, overrides, stored sweep configs). Aliases
# (``*name``) repeat what their anchor holds, so a 1 KB file can stand for gigabytes once
# copied or written back out; the expanded size is counted before anything is built.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file read with the bounded safe loader (plain data only, never objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, loader: type = yaml.SafeLoader) -> Any:
    """YAML text -> plain data with a safe loader, bounded in size, depth and alias expansion;
    any failure is one ConfigError naming ``source`` (and the line, where YAML knows it)."""
    size = len(text.encode("utf-8"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {size / 2**20:.1f} MiB is too large for a recipe (at most "
                          f"{MAX_YAML_BYTES >> 20} MiB)")
    reader = loader(text)
    try:
        node = reader.get_single_node()
        if node is None:
            return None
        _check_bounds(node, source)
        return reader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deep to read (at most {MAX_YAML_DEPTH} "
                          f"levels)") from None
    finally:
        reader.dispose()


def _check_bounds(root: yaml.Node, source: str) -> None:
    """Count the values ``root`` expands to, aliases included, without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_nodes.discard(key)
            line = node.start_mark.line + 1
            if size[key] > MAX_YAML_VALUES:
                raise ConfigError(f"{source} line {line}: expands to more than "
                                  f"{MAX_YAML_VALUES} values through YAML aliases (*name repeats "
                                  f"its anchor); write the values out or use fewer aliases")
            if depth[key] > MAX_YAML_DEPTH:
                raise ConfigError(f"{source} line {line}: nested more than {MAX_YAML_DEPTH} "
                                  f"levels deep")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ConfigError(f"{source} line {node.start_mark.line + 1}: a recursive alias "
                              f"(an anchor used inside itself) has no finite value")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in children(node) if id(k) not in size)


# A name that becomes a folder or file inside another folder: a plain relative name
_BAD_NAME_CHARS = ("\\", "\x00")


def check_name(value: str, field: str, *, nested: bool = False, itself: bool = False) -> str:
    """``value`` if it names something inside its folder (``nested``: a/b allowed; ``itself``:
    '.' for the folder itself), else a ConfigError naming ``field``: no absolute paths, no
    '..', no empty parts."""
    parts = value.split("/") if nested else [value]
    problem = None
    if itself and value == ".":
        return value
    if not value:
        problem = "must not be empty"
    elif value.startswith("/") or (not nested and "/" in value):
        problem = "must be a plain name inside its folder, not a path"
    elif any(p in ("", ".", "..") for p in parts):
        problem = "must stay inside its folder ('..', '.' and empty parts are not allowed)"
    elif any(c in value for c in _BAD_NAME_CHARS):
        problem = "must not contain a backslash or NUL"
    elif any(len(p.encode()) > 255 for p in parts):
        problem = "is longer than a file name may be (255 bytes)"
    if problem:
        raise ConfigError(f"{field}: {value!r} {problem}")
    return value


def child_path(folder: str | os.PathLike, name: str, field: str, *, nested: bool = False,
               itself: bool = False) -> Path:
    """``folder / name`` once ``name`` is checked to stay inside ``folder``."""
    return Path(folder) / check_name(name, field, nested=nested, itself=itself)


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (weights can be large)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
