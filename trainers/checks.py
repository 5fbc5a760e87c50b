"""Checks of a built ``RunConfig`` against the registries and the filesystem, in one place.

``trainers.config`` knows types and ranges only (it imports no registry, so registries may
import it); the names a config holds as free strings - optimizer, model, strategy, data
format, engine, augmentation policy and its params - are checked here, by ``load_config`` for
every command and by the search-space validation for every value a sweep can draw.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from trainers.config import RunConfig
from trainers.errors import ConfigError


def check_names(cfg: RunConfig) -> None:
    """Every registry name in ``cfg`` exists (and the augmentation policy takes its params)."""
    from trainers.augmenting import build_batch_augment
    from trainers.data import check_data
    from trainers.engines import ENGINES
    from trainers.models import model_factory
    from trainers.optim import OPTIMIZERS
    from trainers.strategies import create_strategy

    check_data(cfg.data)
    OPTIMIZERS.get(cfg.optim.name)
    model_factory(cfg.model.name)
    create_strategy(cfg.model.strategy, cfg.model.strategy_params)
    ENGINES.get(cfg.train.engine)
    build_batch_augment(cfg.augment, "text" if cfg.data.format == "text" else "image")


def check_files(cfg: RunConfig, skip: tuple[str, ...] = ()) -> None:
    """Fail early on files named in the config that do not exist (``skip``: dotted fields)."""
    for section in (cfg.data, cfg.model):
        name = type(section).__name__.replace("Config", "").lower()
        for f in dataclasses.fields(section):
            if not f.metadata.get("path") or f"{name}.{f.name}" in skip:
                continue
            value = getattr(section, f.name)
            if value and not Path(value).exists():
                raise ConfigError(f"{name}.{f.name}: {value!r} does not exist "
                                  f"(paths are relative to the current folder {os.getcwd()})")


def check_run(cfg: RunConfig, *, paths: bool = True, skip_paths: tuple[str, ...] = ()) -> None:
    """All of the above: what ``load_config`` runs after the types and ranges passed."""
    if paths:
        check_files(cfg, skip_paths)
    check_names(cfg)
