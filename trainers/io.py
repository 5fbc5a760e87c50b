"""Files written whole or not at all, and loads that never construct objects.

Every record smallshot writes (configs, results, progress, pointers, trial records) goes
through ``write_text``: a temporary file beside the target, then ``os.replace``, so a crash
leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (tmp + rename); create the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file read with the safe loader (plain data only, never objects)."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
