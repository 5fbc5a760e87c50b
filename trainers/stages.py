"""Staged recipes: one YAML file, several runs in order (pretrain on related data, then few-shot).

    name: omniglot-transfer
    data: {...}            # sections at the top are shared by every stage
    stages:
      pretrain: {model: {name: conv4, strategy: protonet}, ...}
      oneshot:  {model: {init_from: pretrain}, ...}   # an earlier stage's name -> its run folder

Each stage is a complete, validated ``RunConfig`` named ``<recipe>-<stage>`` with its own run
folder (so each resumes on its own with ``train.resume=true``). Command-line overrides apply to
every stage; ``stages.<stage>.<key>=value`` applies to one. A stage's ``model.init_from`` that
names an earlier stage becomes that stage's run folder, whose digest is part of this stage's
config: change the pretraining and the few-shot stage gets a new folder too.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from trainers.config import RunConfig
from trainers.errors import ConfigError
from trainers.recipe import build_config, read_recipe


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params",
                                                                               "strategy_params"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def is_staged(path: str | os.PathLike) -> bool:
    return "stages" in read_recipe(path)[0]


def load_stages(path: str | os.PathLike, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> list[RunConfig]:
    """The validated configs of a staged recipe's stages, in order."""
    raw, source = read_recipe(path)
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{source}: stages: expected a mapping of stage name -> sections")
    base = {k: v for k, v in raw.items() if k != "stages"}
    shared, own = [], {str(n): [] for n in stages}
    for item in overrides or []:
        key = item.split("=", 1)[0]
        if key.startswith("stages."):
            stage, _, rest = key[len("stages."):].partition(".")
            if stage not in own or not rest:
                raise ConfigError(f"override {item!r}: no stage {stage!r} (stages: "
                                  f"{', '.join(own)})")
            own[stage].append(item[len(f"stages.{stage}."):])
        else:
            shared.append(item)
    out: list[RunConfig] = []
    folders: dict[str, str] = {}
    for name, section in stages.items():
        name = str(name)
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: stages.{name}: expected a mapping of sections")
        merged = _merge(base, section)
        merged["name"] = f"{base['name']}-{name}"
        init = (merged.get("model") or {}).get("init_from")
        skip: tuple[str, ...] = ()
        if isinstance(init, str) and init in stages:
            if init not in folders:
                raise ConfigError(f"{source}: stages.{name}.model.init_from={init!r}: that "
                                  f"stage must come earlier (order: {', '.join(map(str, stages))})")
            merged["model"]["init_from"] = folders[init]
            skip = ("model.init_from",)  # it exists once the earlier stage has run
        cfg = build_config(merged, shared + own[name], source=f"{source} (stage {name})",
                           line_sources=[section, raw], check_paths=check_paths,
                           skip_paths=skip, base=Path(path).resolve().parent)
        folders[name] = str(cfg.run_dir)
        out.append(cfg)
    return out
