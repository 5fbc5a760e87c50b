"""A strategy's prepared model, kept on disk for the next run that would prepare the same one.

A sweep over what comes after the strategy (``selftrain.rounds: grid[0, 2]``, or
``train.epochs`` where one trial cannot score all its values, cluster/shared_epochs.py) repeats
the same preparation in every trial on the same fold: there the contrastive pair stage is most
of a trial's time, and it ran once per trial and fold. With ``train.prepared_cache`` set (sweeps
set ``<sweep>/prepared``), a run stores the model as its strategy left it, with the random
state, under a key of everything that can change it: the config less the fields in ``AFTER``,
the train split's content, the initial weights and the random state before the strategy. A
later run with the same key loads that instead and goes on exactly as if it had prepared the
model itself. A lock per key makes a concurrent run wait for the one preparing (the kernel
drops it if that run dies) instead of preparing the same model beside it.

``model.soup_folds`` (prepare_fold_soup) builds a final run's model from the k preparations
a k-fold sweep's trials left here, topped up with ``model.soup_topup`` rounds on all K.

Only single-process runs take part (the ranks of DDP or DeepSpeed hold replicas or shards that
one file written by one rank does not give back), and only strategies registered
``reusable=True``: their preparation depends on nothing but the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainers.config import RunConfig
from trainers.data import Split
from trainers.errors import ConfigError
from trainers.locks import flock
from trainers.models import BuiltModel
from trainers.strategies import Strategy, build_strategy, with_rounds

# config fields read only after the strategy has prepared the model (or never by training):
# two runs that differ only here prepare the same model
# (train.num_threads: a sweep's trials set it, the final run may not; threads order the float
# sums of a step, they do not change what is learned)
AFTER = ("name", "train.num_threads", "train.epochs", "train.max_steps", "train.eval_every",
         "train.eval_at_start", "train.monitor", "train.mode", "train.patience", "train.min_delta",
         "train.output_dir", "train.run_name", "train.resume", "train.save_checkpoints",
         "train.progress", "train.test", "train.prepared_cache",
         "data.max_test", "selftrain", "track", "tune", "scaling.storage_path",
         "model.soup_topup")


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p) or {}
    tree.pop(leaf, None)


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def prepared_key(cfg: RunConfig, built: BuiltModel, train: Split) -> str:
    """What the prepared model depends on, hashed: config, train split, initial weights, RNG."""
    tree = cfg.to_dict()
    for dotted in AFTER:
        _drop(tree, dotted)
    # the other strategies' options (a sweep over model.strategy keeps them all) change nothing
    params = tree["model"].get("strategy_params") or {}
    tree["model"]["strategy_params"] = params.get(cfg.model.strategy, {})
    h = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode())
    inputs = train.inputs
    if isinstance(inputs, torch.Tensor):
        _tensor_digest(h, inputs)
    else:
        h.update(json.dumps(list(inputs), default=str).encode())
    _tensor_digest(h, train.labels)
    h.update(json.dumps(list(train.classes or [])).encode())
    for name, value in built.module.state_dict().items():
        h.update(name.encode())
        _tensor_digest(h, value)
    _tensor_digest(h, torch.get_rng_state())
    return h.hexdigest()[:32]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def prepare_or_reuse(cfg: RunConfig, strategy: Strategy, built: BuiltModel, train: Split,
                     device: torch.device, world_size: int) -> bool:
    """``strategy.prepare``, or the model a run with the same key prepared before (True). The
    cache takes no part when it is off, with several ranks or DeepSpeed, and for strategies
    not registered reusable."""
    folder = cfg.train.prepared_cache
    if (not folder or world_size > 1 or cfg.train.engine == "deepspeed"
            or not strategy.reusable):
        strategy.prepare(cfg, built, train, device)
        return False
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _cannot_keep(folder, e)
        strategy.prepare(cfg, built, train, device)
        return False
    path = Path(folder) / f"{prepared_key(cfg, built, train)}.pt"
    with flock(path.with_suffix(".lock")):  # a concurrent trial waits, then reuses
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            built.module.load_state_dict(state["model"])
            built.module.to(device)
            built.module.train(bool(state["training"].item()))
            _set_rng_state(state["rng"], device)
            return True
        strategy.prepare(cfg, built, train, device)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save({"model": built.module.state_dict(), "rng": _rng_state(device),
                        "training": torch.tensor(built.module.training)}, tmp)
            os.replace(tmp, path)  # whole or not at all: a crash never leaves half a model here
        except OSError as e:
            tmp.unlink(missing_ok=True)
            _cannot_keep(folder, e)
    return False


def _cannot_keep(folder: str, e: OSError) -> None:
    """A cache that cannot be written (full disk, read-only) costs reuse, never the run."""
    print(f"warning: train.prepared_cache: could not keep the prepared model in {folder} "
          f"({e.strerror or e}); later runs will prepare their own", flush=True)


def prepare_fold_soup(cfg: RunConfig, strategy: Strategy, built: BuiltModel, train: Split,
                      device: torch.device, world_size: int,
                      fold_split: Callable[[RunConfig], Split]) -> int:
    """``model.soup_folds = k``: the strategy's preparation on each of the k folds' training
    parts, from the same initial weights and random state, as the trials of a k-fold sweep
    prepared them (so each comes from train.prepared_cache when one did); the model is their
    weight average, with the probe head refit on ``train``. Returns how many were reused.

    A k-fold sweep has already paid for these k preparations: the soup hands on what it
    learned without preparing once more on all K shots (benchmarks/fewshot_text.py)."""
    k = cfg.model.soup_folds
    if strategy.refit_head is None:
        raise ConfigError(f"model.soup_folds={k}: model.strategy={cfg.model.strategy} leaves no "
                          f"probe head to refit on the averaged body; use contrastive or lp-ft")
    start = {n: v.detach().clone() for n, v in built.module.state_dict().items()}
    rng = _rng_state(device)
    total: dict[str, torch.Tensor] = {}
    reused = 0
    for fold in range(k):
        fold_cfg = cfg.replace({"data.folds": k, "data.fold": fold, "model.soup_folds": 0},
                               source=f"model.soup_folds (fold {fold})")
        part = fold_split(fold_cfg)
        built.module.load_state_dict(start)
        _set_rng_state(rng, device)
        reused += prepare_or_reuse(fold_cfg, strategy, built, part, device, world_size)
        for name, value in built.module.state_dict().items():
            value = value.detach().float() if value.is_floating_point() else value
            total[name] = total[name] + value if name in total else value.clone()
    built.module.load_state_dict({n: (v / k).to(start[n].dtype) if start[n].is_floating_point()
                                  else start[n] for n, v in total.items()})
    _set_rng_state(rng, device)
    topup = with_rounds(cfg, cfg.model.soup_topup, "model.soup_topup")
    if topup is not None:  # the stage once more, short, on all K: pairs across the folds
        build_strategy(topup).prepare(topup, built, train, device)
    else:
        strategy.refit_head(cfg, built, train, device)
    then = (f"{cfg.model.soup_topup} more round(s) and the probe" if topup is not None
            else "probe refit")
    print(f"model.soup_folds={k}: the mean of {k} fold preparations ({reused} reused from "
          f"train.prepared_cache), {then} on {len(train)} examples", flush=True)
    return reused
