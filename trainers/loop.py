"""``fit(cfg)``: the one training loop, used as is by local runs, Ray Train workers and Tune.

Read top to bottom, ``fit`` is four steps: ``prepare`` (data, model, strategy, engine),
``restore`` (the ``Progress`` of a checkpoint, if resuming), ``train`` (epochs of
``train_step`` with evaluations and checkpoints in between) and ``finish`` (test metrics with
the best weights, the final checkpoint, the hooks).

Reproducibility by construction: the shuffle of epoch e comes from (seed, e) and the RNG of
step s is reseeded from (seed, s, rank), so a run resumed from any checkpoint takes exactly the
steps an uninterrupted run would have taken (trainers/batches.py, trainers/steps.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainers import augmenting, io
from trainers.batches import Batcher, epoch_order, make_train_batch, step_seed
from trainers.checkpoints import (
    Checkpoints,
    barrier,
    check_writable,
    ensure_space,
    load_into,
    load_resume_state,
    prepare_run_dir,
    restore_metrics,
    write_final,
)
from trainers.config import RunConfig
from trainers.data import FewShotData, Split, load_dataset, save_label_map
from trainers.engines import Engine, create_engine, pick_device, world
from trainers.errors import (  # noqa: F401
    CheckpointError,
    DataError,
    SmallshotError,
    TrainingError,  # (fit raises it)
)
from trainers.memory import enable_grad_checkpointing
from trainers.metrics import classification_metrics
from trainers.models import BuiltModel, create_model
from trainers.optim import optimizer_spec, penalty
from trainers.prepared import prepare_fold_soup, prepare_or_reuse
from trainers.selftrain import self_train
from trainers.steps import train_step
from trainers.strategies import Strategy, build_strategy, embed_split
from trainers.timing import Laps
from trainers.tracking import Tracker


@dataclass
class Hooks:
    """How a launcher (Ray Train, Tune) plugs into ``fit`` without ``fit`` importing it."""

    on_evaluation: Callable[[dict[str, Any], Path | None], None] | None = None
    on_finish: Callable[[dict[str, Any], Path | None], None] | None = None  # final metrics
    resume_from: Path | None = None  # a checkpoint folder to continue from
    local_rank: int | None = None
    lock: bool = True  # hold the run folder's lock (Ray Train's driver holds it for its workers)


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
    if len(split) == 0:
        return np.zeros(0, dtype=np.int64)
    engine.train(False)
    logits = embed_split(engine.forward, batcher, split, batch_size)
    engine.train(True)
    return logits.argmax(-1).numpy()


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
        return Checkpoints(cfg.run_dir, world()[0]).pointer("latest", strict=True)
    return None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       smoothing: float) -> torch.Tensor:
    """Cross entropy for class indices or soft targets (mixup/cutmix rows summing to 1)."""
    if targets.dtype.is_floating_point:
        if smoothing:
            targets = targets * (1 - smoothing) + smoothing / targets.shape[-1]
        return torch.sum(-targets * F.log_softmax(logits.float(), -1), -1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


@dataclass
class Progress:
    """Where a run stands: saved as progress.json in every checkpoint, read back on resume."""

    epoch: int = 0  # epochs completed
    micro_in_epoch: int = 0  # micro batches done in the current epoch
    global_step: int = 0  # optimizer steps
    best: float | None = None  # best value of train.monitor so far
    bad_evals: int = 0  # evaluations since it last improved (early stopping)
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation row

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Progress:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def observe(self, value: float | None, cfg: RunConfig) -> bool:
        """Record the monitored value of an evaluation; True when it improved on the best."""
        t = cfg.train
        improved = False
        if value is not None:
            sign = 1.0 if t.mode == "max" else -1.0
            improved = self.best is None or sign * (value - self.best) > t.min_delta
            if improved:
                self.best, self.bad_evals = value, 0
            else:
                self.bad_evals += 1
        self.stopped_early = bool(t.patience and self.bad_evals >= t.patience)
        return improved


@dataclass
class StepPlan:
    """How the training set is cut into micro batches and optimizer steps."""

    micro_batch: int
    grad_accum: int
    total_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, examples: int, world_size: int,
           strategy: Strategy | None = None) -> StepPlan:
        t = cfg.train
        full_batch = optimizer_spec(cfg.optim.name).full_batch  # gd: the whole set per step
        per_rank = math.ceil(examples / world_size)
        micro = per_rank if full_batch else min(t.batch_size, per_rank)
        accum = 1 if full_batch else t.grad_accum
        per_epoch = strategy.micro_batches_per_epoch(examples, micro, world_size) if strategy else None
        steps_per_epoch = math.ceil((per_epoch or math.ceil(per_rank / micro)) / accum)
        return cls(micro, accum, t.max_steps or steps_per_epoch * t.epochs)


@dataclass
class Run:
    """Everything ``prepare`` builds for the steps after it."""

    cfg: RunConfig
    hooks: Hooks
    rank: int
    world_size: int
    run_dir: Path
    data: FewShotData
    train_split: Split
    augment: Any  # augmenting.BatchAugment | None
    built: BuiltModel
    device: torch.device
    plan: StepPlan
    engine: Engine
    batcher: Batcher
    ckpts: Checkpoints
    strategy: Strategy
    resume_dir: Path | None = None  # the checkpoint this run continues from
    best_ckpt: Path | None = None
    bar: Any = None  # tqdm
    started: float = field(default_factory=time.perf_counter)
    window_loss: float = 0.0  # train loss summed since the last evaluation
    window_n: int = 0
    tracker: Tracker | None = None  # rank 0: metrics.csv, TensorBoard, MLflow
    laps: Laps = field(default_factory=Laps)  # where the run's time goes, phase by phase


def fit(cfg: RunConfig, hooks: Hooks | None = None, data: FewShotData | None = None) -> RunResult:
    """Train ``cfg`` and return the final metrics; the only training loop in smallshot.

    Rank 0 holds the run folder's lock throughout: a second run on the same folder is refused
    before it touches anything (unless a launcher that holds the lock says ``lock=False``)."""
    hooks = hooks or Hooks()
    if hooks.lock and world()[0] == 0:
        from trainers.locks import run_folder_lock

        check_writable(cfg)
        with run_folder_lock(cfg.run_dir):
            return _fit(cfg, hooks, data)
    return _fit(cfg, hooks, data)


def _fit(cfg: RunConfig, hooks: Hooks, data: FewShotData | None) -> RunResult:
    run = prepare(cfg, hooks, data)
    progress = restore(run)
    train(run, progress)
    return finish(run, progress)


def prepare(cfg: RunConfig, hooks: Hooks, data: FewShotData | None) -> Run:
    """Run folder, data, model, augmentation, the strategy's preparation, the engine."""
    laps = Laps()
    rank, world_size = world()
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    resume_dir = resume_source(cfg, hooks)
    run_dir = prepare_run_dir(cfg, rank, resume_dir)
    barrier()
    laps.mark("setup")
    data = data or load_dataset(cfg.data, with_test=t.test)
    if cfg.augment.rotated_classes:
        data = augmenting.add_rotated_classes(data)
    if rank == 0:
        save_label_map(data, run_dir)
    device = pick_device(cfg, hooks.local_rank)
    laps.mark("data")
    torch.manual_seed(t.seed)
    strategy = build_strategy(cfg)
    built = create_model(cfg.model, data.num_classes,
                         in_channels=cfg.data.channels if data.modality == "image" else 3)
    if built.provenance is not None and rank == 0:
        io.write_json(run_dir / "init_from.json", built.provenance)
    if t.grad_checkpointing:
        enable_grad_checkpointing(built.module, cfg.model.name)
    laps.mark("model")
    if built.modality != data.modality:
        raise SmallshotError(f"model.name={cfg.model.name!r} takes {built.modality} input but "
                             f"data.format={cfg.data.format!r} gives {data.modality}")
    check_model_takes_data(cfg, built, data)
    if t.save_checkpoints and rank == 0:
        ensure_space(run_dir, built.module, cfg)
    train_split, augment = augmented_train_split(cfg, data)
    # after materialising, so a strategy's own stage (probe, pairs) also sees D ∪ T(D)
    strategy.setup(built)
    named = dataclasses.replace(train_split, classes=data.classes)
    if resume_dir is None and cfg.model.soup_folds:  # a resumed run carries the prepared weights
        if prepare_fold_soup(cfg, strategy, built, named, device, world_size, fold_train_split):
            laps.mark("prepared")
    elif resume_dir is None and prepare_or_reuse(cfg, strategy, built, named, device,
                                                 world_size):
        laps.mark("prepared")  # loaded: an earlier run with the same key prepared this model
    if cfg.selftrain.rounds:
        train_split = self_train(cfg, built, named, data.unlabeled, device, run_dir,
                                 fresh=resume_dir is None, rank=rank)
    laps.mark("strategy")
    plan = StepPlan.of(cfg, len(train_split), world_size, strategy)
    if plan.grad_accum != t.grad_accum:
        cfg = cfg.replace({"train.grad_accum": plan.grad_accum})
    engine = create_engine(cfg, built.module, device, plan.total_steps)
    laps.mark("engine")
    return Run(cfg, hooks, rank, world_size, run_dir, data, train_split, augment, built, device,
               plan, engine, Batcher(cfg, built, device), Checkpoints(run_dir, rank), strategy,
               resume_dir,
               tracker=Tracker(cfg, run_dir) if rank == 0 else None, laps=laps)


@torch.no_grad()
def check_model_takes_data(cfg: RunConfig, built: BuiltModel, data: FewShotData) -> None:
    """One example through the model before anything trains: a model that cannot take the
    data's inputs (an MLP sized for other images, 1-channel images into an RGB network) fails
    here in one line rather than as a shape error deep inside the first step."""
    module = built.module
    was_training = module.training
    module.train(False)
    inputs = Batcher(cfg, built, torch.device("cpu")).inputs(data.train, [0])
    shape = next(tuple(v.shape) for v in inputs.values())
    try:
        logits = module(**inputs)
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"model.name={cfg.model.name!r} cannot take the inputs of "
                        f"data.format={cfg.data.format!r} (one example is {shape}: {first}); "
                        f"match the model to the data (e.g. data.channels, data.image_size, "
                        f"mlp:<inputs>)") from None
    finally:
        module.train(was_training)
    if tuple(logits.shape) != (1, data.num_classes):
        raise DataError(f"model.name={cfg.model.name!r}: gives {tuple(logits.shape)[1:]} outputs "
                        f"per example, the data has {data.num_classes} classes")


def fold_train_split(cfg: RunConfig) -> Split:
    """What a k-fold run of ``cfg`` (data.folds, data.fold) hands its strategy to prepare."""
    data = load_dataset(cfg.data, with_test=False)
    if cfg.augment.rotated_classes:
        data = augmenting.add_rotated_classes(data)
    return dataclasses.replace(augmented_train_split(cfg, data)[0], classes=data.classes)


def augmented_train_split(cfg: RunConfig, data: FewShotData) -> tuple[Split, Any]:
    """The split fit trains on (D, or D ∪ T(D) when materialised) and the per-batch augment."""
    a = cfg.augment
    augment = augmenting.build_batch_augment(a, data.modality)
    if a.policy == "none" or a.mode != "materialised":
        return data.train, augment
    inputs, labels, _ = augmenting.materialise(data.train.inputs, data.train.labels, a,
                                               data.modality, seed=cfg.data.seed)
    mixing_only = dataclasses.replace(a, policy="none", params={}, mode="online")
    return Split(inputs, labels), augmenting.build_batch_augment(mixing_only, data.modality)


def restore(run: Run) -> Progress:
    """The progress of the checkpoint this run continues from (weights loaded), or a fresh one."""
    run.best_ckpt = run.ckpts.pointer("best")
    resume_dir = run.resume_dir
    if resume_dir is None:
        return Progress()
    progress = Progress.of(load_resume_state(run.engine, resume_dir))
    total = run.plan.total_steps
    if ((resume_dir / "result.json").is_file() and not progress.stopped_early
            and progress.global_step < total):
        raise CheckpointError(
            f"train.resume: {resume_dir} is the end of a finished run ({progress.global_step} "
            f"steps; a finished run keeps no optimizer state), this config asks for {total}; "
            f"train a new run (train.resume=false) to train longer")
    if run.rank == 0:  # rows after this checkpoint are redone: drop them, do not repeat them
        restore_metrics(run.run_dir / "metrics.jsonl", progress.history)
    print0(f"resumed from {resume_dir} (epoch {progress.epoch}, step {progress.global_step})")
    return progress


def train(run: Run, progress: Progress) -> None:
    """Epochs of micro steps until the planned steps are done or early stopping says stop."""
    from tqdm.auto import tqdm

    cfg, t, total = run.cfg, run.cfg.train, run.plan.total_steps
    run.bar = tqdm(total=total, initial=progress.global_step, desc=cfg.name,
                   disable=not t.progress or run.rank != 0, dynamic_ncols=True, leave=False)
    if (t.eval_at_start or total == 0) and progress.global_step == 0 and not progress.history:
        # epochs=0 scores what the strategy prepared
        evaluate_and_checkpoint(run, progress, 0.0, last=total == 0)
    run.engine.train(True)
    while not progress.stopped_early and progress.global_step < total:
        if train_epoch(run, progress):
            break
    run.bar.close()
    run.laps.mark("train")


def train_epoch(run: Run, progress: Progress) -> bool:
    """The rest of the current epoch; True when the run is over (steps done or stopped)."""
    cfg, t, plan = run.cfg, run.cfg.train, run.plan
    epoch = progress.epoch
    if cfg.model.freeze_backbone and cfg.model.unfreeze_after is not None:
        run.built.set_backbone_trainable(epoch >= cfg.model.unfreeze_after)
    micro_batches = run.strategy.batches(cfg, run.train_split, epoch, run.rank, run.world_size)
    if micro_batches is None:  # the shuffled examples, cut into micro batches
        order = epoch_order(len(run.train_split), t.seed + cfg.data.seed, epoch, run.rank,
                            run.world_size)
        micro_batches = [(order[i:i + plan.micro_batch], None)
                         for i in range(0, len(order), plan.micro_batch)]
    n_micro = len(micro_batches)
    for m in range(progress.micro_in_epoch, n_micro):
        seed = step_seed(t.seed, epoch * n_micro + m, run.rank)
        loss, stepped = train_step(
            run.engine, partial(classification_loss, run, *micro_batches[m], seed), seed=seed,
            where=f"at epoch {epoch + 1}, step {progress.global_step}", lr=cfg.optim.lr)
        run.window_loss += loss
        run.window_n += 1
        progress.micro_in_epoch = m + 1
        if stepped:
            progress.global_step += 1
            run.bar.update(1)
        last = m == n_micro - 1
        if last:
            progress.epoch, progress.micro_in_epoch = epoch + 1, 0
        at_end = progress.global_step >= plan.total_steps
        if ((stepped and t.eval_every and progress.global_step % t.eval_every == 0)
                or (last and not t.eval_every) or (stepped and at_end)):
            evaluate_and_checkpoint(run, progress, epoch + (m + 1) / n_micro, last=at_end)
        if progress.stopped_early or at_end:
            return True
    return False


def classification_loss(run: Run, idx: list[int], targets: torch.Tensor | None,
                        seed: int) -> torch.Tensor:
    """Cross entropy (soft targets under mixup/cutmix) plus the L1/L2 penalty, one micro batch
    (``targets``: the strategy's, e.g. an episode's query labels; None: the split's labels)."""
    cfg = run.cfg
    inputs, targets = make_train_batch(run.train_split, idx, run.batcher, run.augment,
                                       run.data.num_classes, seed, run.device, targets)
    with run.strategy.training(run.built):
        logits = run.engine.forward(**inputs)
    loss = soft_cross_entropy(logits, targets, cfg.train.label_smoothing)
    extra = penalty(run.built.module, cfg.optim.l1, cfg.optim.l2)
    return loss if extra is None else loss + extra


def evaluate_and_checkpoint(run: Run, progress: Progress, epoch: float, last: bool) -> None:
    """Evaluate, log, checkpoint, report; sets ``progress.stopped_early`` when patience ran out.

    The run's last evaluation is not reported here: on_finish reports it once, together with
    the final metrics (a launcher would otherwise see that row twice)."""
    t = run.cfg.train
    run.laps.mark("train")
    loss, n = run.window_loss, run.window_n
    if run.world_size > 1:  # the loss of the whole global batch, not rank 0's share of it
        sums = torch.tensor([loss, float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        loss, n = float(sums[0]), int(sums[1])
    run.window_loss, run.window_n = 0.0, 0
    row: dict[str, Any] = {"epoch": round(epoch, 4), "step": progress.global_step,
                           "lr": run.engine.lr(),
                           # no step since the last row (epochs=0, eval_at_start): no loss
                           **({"train/loss": loss / n} if n else {}),
                           "time_s": round(time.perf_counter() - run.started, 3)}
    if run.data.val is not None:
        run.strategy.before_evaluation(run.cfg, run.built, run.train_split, run.device)
        row.update(evaluate(run.engine, run.batcher, run.data.val, run.data.num_classes,
                            t.eval_batch_size, "val"))
    run.laps.mark("evaluate")
    value = row.get(t.monitor)
    improved = progress.observe(value, run.cfg)
    progress.history.append(row)
    if run.rank == 0:
        with (run.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        run.tracker.log(row)
    ckpt = None
    if t.save_checkpoints:
        ckpt = run.ckpts.save(run.engine, progress.to_dict(), best=improved or value is None)
        if improved or value is None:
            run.best_ckpt = ckpt
    run.laps.mark("checkpoints")
    if run.hooks.on_evaluation is not None and not (last or progress.stopped_early):
        run.hooks.on_evaluation(row, ckpt)
    run.laps.mark("report")
    run.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in row.items()
                         if k in ("train/loss", t.monitor)})


def finish(run: Run, progress: Progress) -> RunResult:
    """Test metrics with the best weights (when validation chose them), the final checkpoint,
    result.json and the on_finish hook."""
    t, data, best_ckpt = run.cfg.train, run.data, run.best_ckpt
    final: dict[str, Any] = {}
    if data.val is not None and best_ckpt is not None and (best_ckpt / "model.pt").is_file():
        load_into(run.engine, best_ckpt / "model.pt")
    run.strategy.before_evaluation(run.cfg, run.built, run.train_split, run.device)
    if progress.history:
        final.update({k: v for k, v in progress.history[-1].items() if k.startswith("train/")})
        if progress.best is not None:
            final[f"best_{t.monitor}"] = progress.best
    if data.test is not None and t.test:
        final.update(evaluate(run.engine, run.batcher, data.test, data.num_classes,
                              t.eval_batch_size, "test"))
    final["epochs"] = progress.epoch
    final["steps"] = progress.global_step
    summary = {"metrics": final, "stopped_early": progress.stopped_early,
               "best_checkpoint": str(best_ckpt) if best_ckpt else None}
    final_dir = None
    if t.save_checkpoints:
        final_dir = write_final(run.run_dir, run.engine, progress.to_dict(), summary, run.rank)
        if run.rank == 0:
            run.ckpts.finish(final_dir)  # resume of a finished run needs final only
        best_ckpt = final_dir  # the step checkpoints are gone; final holds the tested weights
        summary["best_checkpoint"] = str(final_dir)
    run.laps.mark("final")
    summary["timings"] = run.laps.rounded()  # wall seconds per phase, up to the final report
    if run.rank == 0:
        io.write_json(run.run_dir / "result.json", summary)
        run.tracker.finish(final)
    if run.hooks.on_finish is not None:  # the last evaluation's row with the final metrics
        run.hooks.on_finish({**(progress.history[-1] if progress.history else {}), **final},
                            final_dir)
    return RunResult(run.run_dir, final, progress.history, progress.epoch, progress.global_step,
                     best_ckpt, progress.stopped_early, run.laps.rounded())
