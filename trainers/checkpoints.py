"""Run folders and checkpoints: written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind; ``latest``/``best`` pointer files name
the folders; only last + best are kept.

Every rank writes into the checkpoint folder on its own node (engines write shards), so runs
need no shared filesystem; rank 0 renames and points.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from trainers import io
from trainers.config import RunConfig
from trainers.engines import Engine, world
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

    def pointer(self, name: str) -> Path | None:
        p = self.root / name
        if not p.is_file():
            return None
        target = self.root / p.read_text().strip()
        return target if target.is_dir() else None

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
            self._prune({name, *(p.name for p in (self.pointer("best"),) if p)})
        barrier()
        if self.rank != 0 and tmp.is_dir():  # a node without rank 0 (no shared filesystem)
            try:
                shutil.rmtree(final, ignore_errors=True)
                tmp.replace(final)
            except OSError:
                pass  # another rank of this node renamed it first
        barrier()
        return final

    def _prune(self, keep: set[str]) -> None:
        for p in self.root.glob("step-*"):
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


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
    state = engine.model_state()  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "model.pt")
        io.write_json(tmp / "progress.json", progress)
        io.write_json(tmp / "result.json", summary)
        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.replace(final_dir)
    barrier()
    return final_dir


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model.pt written by an engine (weights only: never unpickles objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_model(cfg: RunConfig, ckpt: Path, num_classes: int) -> BuiltModel:
    """A plain model with a checkpoint's weights (for evaluation or export)."""
    built = create_model(cfg.model.__class__(**{**cfg.model.__dict__, "pretrained": False}),
                         num_classes)
    path = Path(ckpt) / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no model.pt in this checkpoint folder")
    try:
        built.module.load_state_dict(load_weights(path))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit model.name={cfg.model.name!r} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return built
