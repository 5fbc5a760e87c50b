"""Run folders and checkpoints: written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind; ``latest``/``best`` pointer files name
the folders; only last + best are kept while a run trains (the best without its optimizer
state), and only ``final`` once it has finished.

Every rank writes into the checkpoint folder on its own node (engines write shards), so runs
need no shared filesystem; rank 0 renames and points.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainers import io
from trainers.adapters import load_checkpoint_state
from trainers.config import RunConfig
from trainers.engines import Engine, load_file, world
from trainers.errors import CheckpointError, SmallshotError
from trainers.models import BuiltModel, create_model


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


class Checkpoints:
    """checkpoints/step-NNNNNNN folders plus `latest`/`best` pointer files; keeps last + best."""

    def __init__(self, run_dir: Path, rank: int):
        self.root = run_dir / "checkpoints"
        self.rank = rank

    def pointer(self, name: str, strict: bool = False) -> Path | None:
        """The checkpoint a pointer file names; with ``strict``, a pointer to a checkpoint that
        is gone is an error (resuming would silently start over)."""
        p = self.root / name
        if not p.is_file():
            return None
        step = p.read_text().strip()
        target = self.root / step
        if target.is_dir() and target.parent == self.root:
            return target
        if strict:
            raise CheckpointError(f"{p}: names checkpoint {step!r}, which is not in {self.root}; "
                                  f"restore it, or start over without train.resume=true")
        return None

    def save(self, engine: Engine, progress: dict[str, Any], best: bool,
             barrier: Callable[[], None] = barrier) -> Path:
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
            io.write_json(tmp / "progress.json", progress)
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)  # the checkpoint appears whole or not at all
            io.write_text(self.root / "latest", name)
            if best:
                io.write_text(self.root / "best", name)
            self._prune({name, *(p.name for p in (self.pointer("best"),) if p)}, name)
        barrier()
        if self.rank != 0 and tmp.is_dir():  # a node without rank 0 (no shared filesystem)
            try:
                shutil.rmtree(final, ignore_errors=True)
                tmp.replace(final)
            except OSError:
                pass  # another rank of this node renamed it first
        barrier()
        return final

    def _prune(self, keep: set[str], latest: str) -> None:
        for p in self.root.glob("step-*"):
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
            elif p.name != latest:  # kept as best only: resume never needs its optimizer state
                strip_resume_state(p)

    def finish(self, final: Path) -> None:
        """A finished run keeps one checkpoint: ``final`` (what was tested, and what a resume
        of the finished run loads); the step checkpoints it came from go."""
        io.write_text(self.root / "latest", final.name)
        (self.root / "best").unlink(missing_ok=True)
        for p in self.root.glob("step-*"):
            shutil.rmtree(p, ignore_errors=True)


def strip_resume_state(folder: Path) -> None:
    """Drop what only resuming needs (optimizer/scheduler state, DeepSpeed shards)."""
    (folder / "engine.pt").unlink(missing_ok=True)
    shutil.rmtree(folder / "deepspeed", ignore_errors=True)


def check_writable(cfg: RunConfig) -> Path:
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise SmallshotError(f"train.output_dir={cfg.train.output_dir!r}: cannot write run "
                             f"folder {run_dir} ({e.strerror or e})") from None
    return run_dir


def check_resumable(cfg: RunConfig, resume_dir: Path) -> None:
    """Refuse to resume a checkpoint written by another config (another model, data, optimizer,
    augmentation): its weights or optimizer state would not fit, or fit and mean something
    else. How long and how a run trains (train.*) may change."""
    saved = cfg.run_dir / "config.yaml"
    if not saved.is_file():
        return
    from trainers.config import from_dict

    try:
        before = from_dict(io.load_yaml(saved), source=str(saved)).to_dict()
    except (SmallshotError, OSError):
        return  # an unreadable record: the weights' own shapes are checked when they load
    now = cfg.to_dict()
    diff = [f"{section}.{k}" for section in ("data", "model", "optim", "augment")
            for k in sorted(set(before[section]) | set(now[section]))
            if before[section].get(k) != now[section].get(k)]
    if diff:
        raise CheckpointError(f"train.resume: {resume_dir} was written by a run whose "
                              f"{', '.join(diff[:3])} differ from this config (see {saved}); "
                              f"resume with the same config or choose another train.run_name")


def prepare_run_dir(cfg: RunConfig, rank: int, resume_dir: Path | None) -> Path:
    """Create the run folder (checking it is writable) and save the resolved config.

    A fresh run clears what an earlier run left there; a resumed one rewrites metrics.jsonl
    from the checkpoint's own history, so rows written after that checkpoint (a crash between
    an evaluation and its checkpoint) are not repeated when they are redone.
    """
    run_dir = cfg.run_dir
    if rank == 0:
        check_writable(cfg)
        if resume_dir is None:
            for stale in ("checkpoints", "metrics.jsonl", "result.json"):
                p = run_dir / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            check_resumable(cfg, resume_dir)
        cfg.save(run_dir / "config.yaml")
    return run_dir


def restore_metrics(metrics_file: Path, history: list[dict[str, Any]]) -> None:
    io.write_text(metrics_file, "".join(json.dumps(row) + "\n" for row in history))


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


def write_final(run_dir: Path, engine: Engine, progress: dict[str, Any],
                summary: dict[str, Any], rank: int) -> Path:
    """checkpoints/final: the weights the test metrics came from, a plain model.pt for export."""
    final_dir = run_dir / "checkpoints" / "final"
    tmp = run_dir / "checkpoints" / ".tmp-final"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_weights(tmp, rank)  # collective under DDP and ZeRO-3: every rank takes part
    if rank == 0:
        io.write_json(tmp / "progress.json", progress)
        io.write_json(tmp / "result.json", summary)
        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.replace(final_dir)
    barrier()
    return final_dir


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model.pt written by an engine (weights only: never unpickles objects)."""
    return load_file(path)


def load_into(engine: Engine, path: Path) -> None:
    """Weights into the engine's model; weights of another architecture are a CheckpointError
    naming the file and the first parameter that does not fit."""
    state = load_weights(path)
    try:
        engine.load_model_state(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit this run's model ({first_mismatch(e)})"
                              ) from None


def first_mismatch(e: RuntimeError) -> str:
    """The useful line of load_state_dict's many-line error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if "size mismatch" in ln or "Missing" in ln
                   or "Unexpected" in ln), lines[0] if lines else type(e).__name__)
    return detail[:200]


def load_resume_state(engine: Engine, resume_dir: Path) -> dict[str, Any]:
    """Weights (and optimizer state, unless the run had finished) and progress of a checkpoint."""
    progress_file = resume_dir / "progress.json"
    try:
        progress = io.read_json(progress_file)
        progress["history"], progress["global_step"]  # noqa: B018 - the keys resume needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{progress_file}: missing or unreadable ({type(e).__name__}); "
                              f"the checkpoint is incomplete") from None
    if (resume_dir / "result.json").is_file():  # a finished run: its final weights only
        load_into(engine, resume_dir / "model.pt")
        return progress
    try:
        engine.load(resume_dir)
    except RuntimeError as e:
        raise CheckpointError(f"{resume_dir}: does not fit this run's model "
                              f"({first_mismatch(e)})") from None
    return progress


def load_checkpoint_model(cfg: RunConfig, ckpt: Path, num_classes: int) -> BuiltModel:
    """A plain model with a checkpoint's weights (for evaluation or export).

    An adapter checkpoint holds the adapter and head only: the backbone is built as the run
    built it (pretrained files or seed) and the checkpoint goes on top.
    """
    if cfg.model.adapter == "none":  # every weight comes from the file
        cfg = cfg.replace({"model.pretrained": False, "model.init_from": None})
    else:
        torch.manual_seed(cfg.train.seed)  # a random-init backbone is the run's own
    built = create_model(cfg.model, num_classes,
                         in_channels=cfg.data.channels if cfg.data.format != "text" else 3)
    path = Path(ckpt) / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no model.pt in this checkpoint folder")
    try:
        load_checkpoint_state(built.module, load_weights(path), str(path))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit model.name={cfg.model.name!r} "
                              f"({first_mismatch(e)})") from None
    return built
