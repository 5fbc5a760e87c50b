"""``fit(cfg)``: the one training loop, used as is by local runs, Ray Train workers and Tune.

Reproducibility by construction: the shuffle of epoch e comes from (seed, e) and the RNG of
step s is reseeded from (seed, s, rank), so a run resumed from any checkpoint takes exactly the
steps an uninterrupted run would have taken. Checkpoints are folders written under a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainers import augmenting, io
from trainers.batches import Batcher, epoch_order, make_train_batch, seed_step, step_seed
from trainers.checkpoints import (Checkpoints, barrier, ensure_space, load_weights,
                                  prepare_run_dir, write_final)
from trainers.config import RunConfig
from trainers.data import FewShotData, Split, load_dataset, save_label_map
from trainers.engines import create_engine, pick_device, world
from trainers.errors import SmallshotError
from trainers.metrics import classification_metrics
from trainers.models import create_model
from trainers.optim import optimizer_spec, penalty
from trainers.strategies import create_strategy
from trainers.timing import Laps


class TrainingError(SmallshotError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


@dataclass
class Hooks:
    """How a launcher (Ray Train, Tune) plugs into ``fit`` without ``fit`` importing it."""

    on_evaluation: Callable[[dict[str, Any], Path | None], None] | None = None
    on_finish: Callable[[dict[str, Any], Path | None], None] | None = None  # final metrics
    resume_from: Path | None = None  # a checkpoint folder to continue from
    local_rank: int | None = None


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # final: test/* (and the best val/* seen)
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (trainers.timing)


def print0(*args: Any) -> None:
    if world()[0] == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(engine, batcher: Batcher, split: Split, batch_size: int) -> np.ndarray:
    engine.train(False)
    preds = []
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        logits = engine.forward(**batcher.inputs(split, idx))
        preds.append(logits.float().argmax(-1).cpu())
    engine.train(True)
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(engine, batcher: Batcher, split: Split, num_classes: int, batch_size: int,
             prefix: str) -> dict[str, float]:
    pred = predict(engine, batcher, split, batch_size)
    m = classification_metrics(split.labels.numpy(), pred, num_classes)
    return {f"{prefix}/{k}": v for k, v in m.items()}


# --------------------------------------------------------------------------------------------
# The loop


def resume_source(cfg: RunConfig, hooks: Hooks) -> Path | None:
    """The checkpoint folder this run continues from, if any."""
    if hooks.resume_from is not None:
        return Path(hooks.resume_from)
    if cfg.train.resume:
        return Checkpoints(cfg.run_dir, world()[0]).pointer("latest")
    return None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       smoothing: float) -> torch.Tensor:
    """Cross entropy for class indices or soft targets (mixup/cutmix rows summing to 1)."""
    if targets.dtype.is_floating_point:
        if smoothing:
            targets = targets * (1 - smoothing) + smoothing / targets.shape[-1]
        return torch.sum(-targets * F.log_softmax(logits.float(), -1), -1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def fit(cfg: RunConfig, hooks: Hooks | None = None, data: FewShotData | None = None) -> RunResult:
    """Train ``cfg`` and return the final metrics; the only training loop in smallshot."""
    hooks = hooks or Hooks()
    laps = Laps()
    rank, world_size = world()
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = prepare_run_dir(cfg, rank)
    barrier()
    laps.mark("setup")
    data = data or load_dataset(cfg.data, with_test=t.test)
    if rank == 0:
        save_label_map(data, run_dir)
    device = pick_device(cfg, hooks.local_rank)
    laps.mark("data")
    torch.manual_seed(t.seed)
    built = create_model(cfg.model, data.num_classes)
    laps.mark("model")
    if built.modality != data.modality:
        raise SmallshotError(f"model.name={cfg.model.name!r} takes {built.modality} input but "
                             f"data.format={cfg.data.format!r} gives {data.modality}")
    if t.save_checkpoints and rank == 0:
        ensure_space(run_dir, built.module, cfg)
    train_split = data.train
    augment = augmenting.build_batch_augment(cfg.augment, data.modality)
    if cfg.augment.policy != "none" and cfg.augment.mode == "materialised":
        inputs, labels, _ = augmenting.materialise(train_split.inputs, train_split.labels,
                                                   cfg.augment, data.modality, seed=cfg.data.seed)
        train_split = Split(inputs, labels)
        augment = augmenting.build_batch_augment(cfg.augment.__class__(
            policy="none", mixup_alpha=cfg.augment.mixup_alpha,
            cutmix_alpha=cfg.augment.cutmix_alpha), data.modality)
    # after materialising, so a strategy's own stage (probe, pairs) also sees D ∪ T(D)
    if resume_source(cfg, hooks) is None:  # a resumed run already carries the prepared weights
        create_strategy(cfg.model.strategy)(cfg, built, train_split, device)
    laps.mark("strategy")

    full_batch = optimizer_spec(cfg.optim.name).full_batch
    per_rank = math.ceil(len(train_split) / world_size)
    micro_bs = per_rank if full_batch else min(t.batch_size, per_rank)
    micro_per_epoch = math.ceil(per_rank / micro_bs)
    accum = 1 if full_batch else t.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    if full_batch and t.grad_accum != 1:
        cfg = cfg.replace({"train.grad_accum": 1})
    engine = create_engine(cfg, built.module, device, total_steps)
    batcher = Batcher(cfg, built, device)
    ckpts = Checkpoints(run_dir, rank)
    laps.mark("engine")

    progress = {"epoch": 0, "micro_in_epoch": 0, "global_step": 0, "best": None, "bad_evals": 0,
                "history": []}
    resume_dir = resume_source(cfg, hooks)
    if resume_dir is not None:
        if (resume_dir / "result.json").is_file():  # a finished run: its final weights only
            engine.load_model_state(load_weights(resume_dir / "model.pt"))
        else:
            engine.load(resume_dir)
        progress = io.read_json(resume_dir / "progress.json")
        print0(f"resumed from {resume_dir} (epoch {progress['epoch']}, step "
               f"{progress['global_step']})")
    history: list[dict[str, Any]] = progress["history"]
    mode_sign = 1.0 if t.mode == "max" else -1.0
    metrics_file = run_dir / "metrics.jsonl"
    stopped_early = progress.get("stopped_early", False)
    best_ckpt: Path | None = ckpts.pointer("best")

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=progress["global_step"], desc=cfg.name,
               disable=not t.progress or rank != 0, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    window_loss, window_n = 0.0, 0

    def run_evaluation(epoch_float: float) -> bool:
        """Evaluate, log, checkpoint, report; True when early stopping says stop."""
        nonlocal best_ckpt, window_loss, window_n
        laps.mark("train")
        if world_size > 1:  # the loss of the whole global batch, not rank 0's share of it
            sums = torch.tensor([window_loss, float(window_n)], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            window_loss, window_n = float(sums[0]), int(sums[1])
        row: dict[str, Any] = {"epoch": round(epoch_float, 4), "step": progress["global_step"],
                               "lr": engine.lr(), "train/loss": window_loss / max(window_n, 1),
                               "time_s": round(time.perf_counter() - t0, 3)}
        window_loss, window_n = 0.0, 0
        if data.val is not None:
            row.update(evaluate(engine, batcher, data.val, data.num_classes, t.eval_batch_size,
                                "val"))
        laps.mark("evaluate")
        value = row.get(t.monitor)
        improved = False
        if value is not None:
            best = progress["best"]
            improved = best is None or mode_sign * (value - best) > t.min_delta
            if improved:
                progress["best"] = value
                progress["bad_evals"] = 0
            else:
                progress["bad_evals"] += 1
        stop = bool(t.patience and progress["bad_evals"] >= t.patience)
        progress["stopped_early"] = stop
        history.append(row)
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        ckpt = None
        if t.save_checkpoints:
            ckpt = ckpts.save(engine, progress, best=improved or value is None)
            if improved or value is None:
                best_ckpt = ckpt
        laps.mark("checkpoints")
        if hooks.on_evaluation is not None:
            hooks.on_evaluation(row, ckpt)
        laps.mark("report")
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in row.items()
                         if k in ("train/loss", t.monitor)})
        return stop

    if (t.eval_at_start or total_steps == 0) and progress["global_step"] == 0 and not history:
        stopped_early = run_evaluation(0.0)  # epochs=0 scores what the strategy prepared
    engine.train(True)
    while not stopped_early and progress["global_step"] < total_steps:
        epoch = progress["epoch"]
        if cfg.model.freeze_backbone and cfg.model.unfreeze_after is not None:
            built.set_backbone_trainable(epoch >= cfg.model.unfreeze_after)
        order = epoch_order(len(train_split), t.seed + cfg.data.seed, epoch, rank, world_size)
        micro_batches = [order[i:i + micro_bs] for i in range(0, len(order), micro_bs)]
        n_micro = len(micro_batches)
        for m in range(progress["micro_in_epoch"], n_micro):
            step = progress["global_step"]
            seed = step_seed(t.seed, epoch * n_micro + m, rank)
            seed_step(seed, device)  # dropout & co. depend on the position only: exact resume
            idx = micro_batches[m]
            inputs, targets = make_train_batch(train_split, idx, batcher, augment,
                                               data.num_classes, seed, device)
            loss = soft_cross_entropy(engine.forward(**inputs), targets, t.label_smoothing)
            extra = penalty(built.module, cfg.optim.l1, cfg.optim.l2)
            if extra is not None:
                loss = loss + extra
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step "
                                    f"{step}: lower optim.lr (now {cfg.optim.lr:g}) or check the "
                                    f"data; the run stopped before training on it")
            engine.backward(loss)
            window_loss += float(loss.detach())
            window_n += 1
            stepped = engine.step()
            progress["micro_in_epoch"] = m + 1
            if stepped:
                progress["global_step"] += 1
                bar.update(1)
            last = m == n_micro - 1
            if last:
                progress["epoch"] = epoch + 1
                progress["micro_in_epoch"] = 0
            at_end = progress["global_step"] >= total_steps
            due = ((stepped and t.eval_every and progress["global_step"] % t.eval_every == 0)
                   or (last and not t.eval_every) or (stepped and at_end))
            if due:
                stopped_early = run_evaluation(epoch + (m + 1) / n_micro)
            if stopped_early or at_end:
                break
    bar.close()
    laps.mark("train")

    # final evaluation on the test split, with the best weights when validation chose them
    final: dict[str, Any] = {}
    if data.val is not None and best_ckpt is not None and (best_ckpt / "model.pt").is_file():
        state = load_weights(best_ckpt / "model.pt")
        engine.load_model_state(state)
    if history:
        final.update({k: v for k, v in history[-1].items() if k.startswith("train/")})
        if progress["best"] is not None:
            final[f"best_{t.monitor}"] = progress["best"]
    if data.test is not None and t.test:
        final.update(evaluate(engine, batcher, data.test, data.num_classes, t.eval_batch_size,
                              "test"))
    final["epochs"] = progress["epoch"]
    final["steps"] = progress["global_step"]
    summary = {"metrics": final, "stopped_early": stopped_early,
               "best_checkpoint": str(best_ckpt) if best_ckpt else None}
    final_dir = write_final(run_dir, engine, progress, summary, rank) if t.save_checkpoints else None
    laps.mark("final")
    summary["timings"] = laps.rounded()  # wall seconds per phase, up to the final report
    if rank == 0:
        io.write_json(run_dir / "result.json", summary)
    if hooks.on_finish is not None:
        hooks.on_finish(final, final_dir)
    return RunResult(run_dir, final, history, progress["epoch"], progress["global_step"],
                     best_ckpt, stopped_early, laps.rounded())



