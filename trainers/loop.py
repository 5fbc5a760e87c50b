"""``fit(cfg)``: the one training loop, used as is by local runs, Ray Train workers and Tune.

Reproducibility by construction: the shuffle of epoch e comes from (seed, e) and the RNG of
step s is reseeded from (seed, s, rank), so a run resumed from any checkpoint takes exactly the
steps an uninterrupted run would have taken. Checkpoints are folders written under a temporary
name and renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainers import augmenting
from trainers.config import RunConfig
from trainers.data import FewShotData, Split, load_dataset, save_label_map
from trainers.engines import create_engine, pick_device, world
from trainers.errors import CheckpointError, SmallshotError
from trainers.metrics import classification_metrics
from trainers.models import BuiltModel, create_model
from trainers.optim import optimizer_spec, penalty
from trainers.strategies import create_strategy


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


def print0(*args: Any) -> None:
    if world()[0] == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------
# Batches


class Batcher:
    """Turns examples into model inputs on the device: tokenises text, normalises images."""

    def __init__(self, cfg: RunConfig, built: BuiltModel, device: torch.device):
        self.cfg = cfg
        self.tokenizer = built.tokenizer
        self.device = device
        d = cfg.data
        self.mean = torch.tensor(d.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(d.std, device=device).view(1, -1, 1, 1)

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.cfg.data.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inputs(self, split: Split, idx: list[int]) -> dict[str, torch.Tensor]:
        if isinstance(split.inputs, torch.Tensor):
            x = split.inputs[torch.as_tensor(idx)].to(self.device, non_blocking=True)
            return {"pixels": self.images(x)}
        return self.texts([split.inputs[i] for i in idx])


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """The example order of one epoch for one rank: a shared shuffle, strided over ranks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if world_size > 1:  # pad so every rank takes the same number of steps
        order += order[: (-len(order)) % world_size]
        order = order[rank::world_size]
    return order


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 2_147_483 + step * 7919 + rank * 104_729) % (2 ** 63)


def seed_step(seed: int, device: torch.device) -> None:
    # torch.manual_seed also walks every lazily seeded accelerator (~250 µs a call on a CUDA
    # build without a GPU); seeding only the generators this step uses costs ~5 µs
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def make_train_batch(split: Split, idx: list[int], batcher: Batcher, augment, num_classes: int,
                     seed: int, device: torch.device, targets: torch.Tensor | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs and targets of one training micro batch, augmented online when asked."""
    targets = (split.labels[torch.as_tensor(idx)] if targets is None else targets).to(device)
    if augment is None:
        return batcher.inputs(split, idx), targets
    gen = torch.Generator(device=device).manual_seed(seed)
    if isinstance(split.inputs, torch.Tensor):
        x = augment.images(split.inputs[torch.as_tensor(idx)].to(device), gen)
        x, targets = augment.mix(x, targets, num_classes, gen)
        return {"pixels": batcher.images(x)}, targets
    texts = augment.texts([split.inputs[i] for i in idx], random.Random(seed))
    inputs = batcher.texts(texts)
    inputs["input_ids"] = augment.tokens(inputs["input_ids"], inputs["attention_mask"], gen,
                                         batcher.tokenizer.mask_token_id)
    return inputs, targets


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
# Checkpoints


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Checkpoints:
    """checkpoints/step-NNNNNNN folders plus `latest`/`best` pointer files; keeps last + best."""

    def __init__(self, run_dir: Path, rank: int):
        self.root = run_dir / "checkpoints"
        self.rank = rank

    def pointer(self, name: str) -> Path | None:
        p = self.root / name
        if not p.is_file():
            return None
        target = self.root / p.read_text().strip()
        return target if target.is_dir() else None

    def save(self, engine, progress: dict[str, Any], best: bool,
             barrier: Callable[[], None]) -> Path:
        name = f"step-{progress['global_step']:07d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        tmp.mkdir(parents=True, exist_ok=True)  # every node, shared filesystem or not
        engine.save(tmp, self.rank)
        barrier()
        if self.rank == 0:
            _write_json(tmp / "progress.json", progress)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint appears whole or not at all
            _write_json_text(self.root / "latest", name)
            if best:
                _write_json_text(self.root / "best", name)
            self._prune({name, *(p.name for p in (self.pointer("best"),) if p)})
        barrier()
        if self.rank != 0 and tmp.is_dir():  # a node without rank 0 (no shared filesystem)
            try:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except OSError:
                pass  # another rank of this node renamed it first
        barrier()
        return final

    def _prune(self, keep: set[str]) -> None:
        for p in self.root.glob("step-*"):
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _write_json_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def prepare_run_dir(cfg: RunConfig, rank: int) -> Path:
    """Create the run folder (checking it is writable) and save the resolved config."""
    run_dir = cfg.run_dir
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as e:
            raise SmallshotError(f"train.output_dir={cfg.train.output_dir!r}: cannot write run "
                                 f"folder {run_dir} ({e.strerror or e})") from None
        if not cfg.train.resume:
            for stale in ("checkpoints", "metrics.jsonl", "result.json"):
                p = run_dir / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        cfg.save(run_dir / "config.yaml")
    return run_dir


# --------------------------------------------------------------------------------------------
# The loop


def ensure_space(run_dir: Path, module: torch.nn.Module, cfg: RunConfig) -> None:
    """Refuse to start when the disk cannot hold the checkpoints this run will write."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    # last + best + final, each weights plus up to two optimizer moments, plus slack for a rename
    needed = int(weights * 3 * 3 * 1.1)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise SmallshotError(
            f"train.output_dir={cfg.train.output_dir!r}: {free / 2**20:.1f} MiB free on that disk, "
            f"checkpoints of this model need about {needed / 2**20:.1f} MiB; free space, choose "
            f"another train.output_dir or set train.save_checkpoints=false")


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
    rank, world_size = world()
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = prepare_run_dir(cfg, rank)
    _barrier()
    data = data or load_dataset(cfg.data, with_test=t.test)
    if cfg.augment.rotated_classes:
        data = augmenting.add_rotated_classes(data)
    if rank == 0:
        save_label_map(data, run_dir)
    device = pick_device(cfg, hooks.local_rank)
    torch.manual_seed(t.seed)
    strategy = create_strategy(cfg.model.strategy, cfg.model.strategy_params)
    built = create_model(cfg.model, data.num_classes,
                         in_channels=cfg.data.channels if data.modality == "image" else 3)
    if built.provenance is not None and rank == 0:
        _write_json(run_dir / "init_from.json", built.provenance)
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
    strategy.setup(built)
    if resume_source(cfg, hooks) is None:  # a resumed run already carries the prepared weights
        strategy.prepare(cfg, built, train_split, device)

    full_batch = optimizer_spec(cfg.optim.name).full_batch
    per_rank = math.ceil(len(train_split) / world_size)
    micro_bs = per_rank if full_batch else min(t.batch_size, per_rank)
    micro_per_epoch = (strategy.micro_batches_per_epoch(len(train_split), micro_bs, world_size)
                       or math.ceil(per_rank / micro_bs))
    accum = 1 if full_batch else t.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    if full_batch and t.grad_accum != 1:
        cfg = cfg.replace({"train.grad_accum": 1})
    engine = create_engine(cfg, built.module, device, total_steps)
    batcher = Batcher(cfg, built, device)
    ckpts = Checkpoints(run_dir, rank)

    progress = {"epoch": 0, "micro_in_epoch": 0, "global_step": 0, "best": None, "bad_evals": 0,
                "history": []}
    resume_dir = resume_source(cfg, hooks)
    if resume_dir is not None:
        if (resume_dir / "result.json").is_file():  # a finished run: its final weights only
            engine.load_model_state(torch.load(resume_dir / "model.pt", map_location="cpu",
                                               weights_only=True))
        else:
            engine.load(resume_dir)
        progress = json.loads((resume_dir / "progress.json").read_text())
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
        if world_size > 1:  # the loss of the whole global batch, not rank 0's share of it
            sums = torch.tensor([window_loss, float(window_n)], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            window_loss, window_n = float(sums[0]), int(sums[1])
        row: dict[str, Any] = {"epoch": round(epoch_float, 4), "step": progress["global_step"],
                               "lr": engine.lr(), "train/loss": window_loss / max(window_n, 1),
                               "time_s": round(time.perf_counter() - t0, 3)}
        window_loss, window_n = 0.0, 0
        if data.val is not None:
            strategy.before_evaluation(cfg, built, train_split, device)
            row.update(evaluate(engine, batcher, data.val, data.num_classes, t.eval_batch_size,
                                "val"))
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
            ckpt = ckpts.save(engine, progress, best=improved or value is None, barrier=_barrier)
            if improved or value is None:
                best_ckpt = ckpt
        if hooks.on_evaluation is not None:
            hooks.on_evaluation(row, ckpt)
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
        micro_batches = strategy.batches(cfg, train_split, epoch, rank, world_size)
        if micro_batches is None:
            order = epoch_order(len(train_split), t.seed + cfg.data.seed, epoch, rank, world_size)
            micro_batches = [(order[i:i + micro_bs], None) for i in range(0, len(order), micro_bs)]
        n_micro = len(micro_batches)
        for m in range(progress["micro_in_epoch"], n_micro):
            step = progress["global_step"]
            seed = step_seed(t.seed, epoch * n_micro + m, rank)
            seed_step(seed, device)  # dropout & co. depend on the position only: exact resume
            idx, targets = micro_batches[m]
            inputs, targets = make_train_batch(train_split, idx, batcher, augment,
                                               data.num_classes, seed, device, targets)
            with strategy.training(built):
                logits = engine.forward(**inputs)
            loss = soft_cross_entropy(logits, targets, t.label_smoothing)
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

    # final evaluation on the test split, with the best weights when validation chose them
    final: dict[str, Any] = {}
    if data.val is not None and best_ckpt is not None and (best_ckpt / "model.pt").is_file():
        state = torch.load(best_ckpt / "model.pt", map_location="cpu", weights_only=True)
        engine.load_model_state(state)
    strategy.before_evaluation(cfg, built, train_split, device)  # e.g. prototypes of the end
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
    if rank == 0:
        _write_json(run_dir / "result.json", summary)
    if hooks.on_finish is not None:
        hooks.on_finish(final, final_dir)
    return RunResult(run_dir, final, history, progress["epoch"], progress["global_step"],
                     best_ckpt, stopped_early)


def write_final(run_dir: Path, engine, progress: dict[str, Any], summary: dict[str, Any],
                rank: int) -> Path:
    """checkpoints/final: the weights the test metrics came from, a plain model.pt for export."""
    final_dir = run_dir / "checkpoints" / "final"
    tmp = run_dir / "checkpoints" / ".tmp-final"
    state = engine.model_state()  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "model.pt")
        _write_json(tmp / "progress.json", progress)
        _write_json(tmp / "result.json", summary)
        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    _barrier()
    return final_dir


def load_checkpoint_model(cfg: RunConfig, ckpt: Path, num_classes: int) -> BuiltModel:
    """A plain model with a checkpoint's weights (for evaluation or export)."""
    built = create_model(cfg.model.__class__(**{**cfg.model.__dict__, "pretrained": False}),
                         num_classes)
    path = Path(ckpt) / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no model.pt in this checkpoint folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        built.module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit model.name={cfg.model.name!r} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return built
