"""Checks of a built ``RunConfig`` against the registries and the filesystem, in one place.

``trainers.config`` knows types and ranges only (it imports no registry, so registries may
import it); the names a config holds as free strings - optimizer, model, strategy, data
format, engine, augmentation policy and its params - are checked here, by ``load_config`` for
every command and by the search-space validation for every value a sweep can draw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainers.config import RunConfig
from trainers.errors import ConfigError


def check_names(cfg: RunConfig) -> None:
    """Every registry name in ``cfg`` exists, and the chosen model, strategy and augmentation
    policy take the params given to them."""
    from trainers.adapters import check_adapter
    from trainers.augmenting import build_batch_augment
    from trainers.data import check_data
    from trainers.engines import ENGINES
    from trainers.models import model_params
    from trainers.optim import OPTIMIZERS
    from trainers.strategies import build_strategy

    check_data(cfg.data)
    OPTIMIZERS.get(cfg.optim.name)
    model_params(cfg.model)
    check_adapter(cfg.model)
    build_strategy(cfg)  # params checked against its signature, and its own checks
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
            if value and value not in f.metadata["keywords"] and not Path(value).exists():
                raise ConfigError(f"{name}.{f.name}: {value!r} does not exist (a recipe's "
                                  f"relative paths are read from the recipe's folder, an "
                                  f"override's from the current folder)")


def check_path_names(cfg: RunConfig) -> None:
    """Names that become files or folders stay inside the folder they are meant for."""
    from trainers import io

    io.check_name(cfg.name, "name")
    if cfg.train.run_name is not None:
        io.check_name(cfg.train.run_name, "train.run_name", nested=True)
    if cfg.tune.name is not None:
        io.check_name(cfg.tune.name, "tune.name")
    io.check_name(cfg.data.train_split, "data.train_split", itself=True)  # '.': root itself
    if cfg.data.test_split is not None:
        io.check_name(cfg.data.test_split, "data.test_split", itself=True)


def check_run(cfg: RunConfig, *, paths: bool = True, skip_paths: tuple[str, ...] = ()) -> None:
    """All of the above: what ``load_config`` runs after the types and ranges passed."""
    check_path_names(cfg)
    if paths:
        check_files(cfg, skip_paths)
    check_names(cfg)
