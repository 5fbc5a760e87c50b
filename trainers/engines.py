"""Engines: how one optimizer step happens (single process, DDP, DeepSpeed ZeRO 0-3).

One interface (``Engine``), three implementations (``PlainEngine``, ``DDPEngine``,
``DeepSpeedEngine``), chosen by ``train.engine`` through the ``ENGINES`` registry. The loop
talks to every engine the same way::

    logits = engine.forward(**inputs)
    engine.backward(loss)          # once per micro batch
    stepped = engine.step()        # once per micro batch; True when the optimizer stepped
    engine.save(dir) / engine.load(dir) / engine.model_state()

Parallelism is applied to the model from outside; engines never import Ray. A launcher (Ray
Train) creates the process group; engines only read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainers.adapters import checkpoint_state, has_adapter, load_checkpoint_state
from trainers.config import RunConfig
from trainers.errors import CheckpointError, ConfigError
from trainers.optim import create_optimizer, create_scheduler
from trainers.registry import Registry


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(cfg: RunConfig, local_rank: int | None = None) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible to this process")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): there bf16 autocast
    ran a MiniLM CV fold 1.7x and test inference 2x faster than fp32 (fewshot_bf16.md);
    elsewhere torch emulates bf16 and it is slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on a CPU fp32, or bf16 when asked (torch runs it);
    bf16-native: bf16 on CUDA and on a CPU with bf16 arithmetic, fp32 on other CPUs."""
    p = cfg.train.precision
    if p == "bf16-native":
        return torch.bfloat16 if device.type == "cuda" or native_bf16_cpu() else None
    if p == "fp32" or (p == "auto" and device.type != "cuda"):
        return None
    if p == "fp16" and device.type != "cuda":  # as HF Trainer: fp16 mixed precision needs a GPU
        raise ConfigError("train.precision=fp16: float16 training needs CUDA (loss scaling) and "
                          "this process has none; use bf16 or fp32 on CPU")
    if p in ("bf16", "auto"):
        return torch.bfloat16
    return torch.float16


class Engine(ABC):
    """The interface: how fit and the strategies' stages run a model and step its optimizer.

    ``module`` is the bare model (for weights and freezing), ``device`` where batches go.
    """

    name: str
    module: nn.Module
    device: torch.device

    @abstractmethod
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The (wrapped) model's output for one batch."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro batch's loss."""

    @abstractmethod
    def step(self) -> bool:
        """End a micro batch; True when it completed an optimizer step."""

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def train(self, mode: bool = True) -> None: ...

    @abstractmethod
    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model weights (on rank 0 at least), for export and evaluation."""

    @abstractmethod
    def load_model_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_weights(self, folder: Path, rank: int) -> None:
        """Write model.pt (full weights) from rank 0: all an evaluation or export needs.
        Every rank calls it (gathering the weights is collective under ZeRO-3)."""
        state = self.model_state()
        if rank == 0:
            torch.save(state, folder / "model.pt")

    @abstractmethod
    def save(self, folder: Path, rank: int) -> None:
        """Write this rank's part of a checkpoint into ``folder`` (model.pt from rank 0)."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Restore weights and optimizer state from a checkpoint folder."""


class PlainEngine(Engine):
    """Single process: plain PyTorch with gradient accumulation and optional autocast."""

    name = "plain"

    def __init__(self, cfg: RunConfig, module: nn.Module, device: torch.device, total_steps: int):
        self.cfg = cfg
        self.device = device
        self.module = module.to(device)
        self.model: nn.Module = self._wrap(self.module)
        self.optimizer = create_optimizer(cfg.optim, self.module)
        self.scheduler = create_scheduler(cfg.optim, self.optimizer, total_steps)
        self.accum = cfg.train.grad_accum
        self.micro = 0
        self.dtype = autocast_dtype(cfg, device)
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    # -- the step -------------------------------------------------------------------------
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype
               else contextlib.nullcontext())
        with ctx:
            return self.model(**inputs)

    def _boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def _sync_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        with self._sync_context():
            self.scaler.scale(loss / self.accum).backward()

    def step(self) -> bool:
        boundary = self._boundary()
        self.micro += 1
        if not boundary:
            return False
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # -- state ----------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps (on rank 0 at least): all, or adapter + head."""
        return checkpoint_state(self.module, {k: v.detach().cpu()
                                              for k, v in self.module.state_dict().items()})

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        load_checkpoint_state(self.module, state, "checkpoint")

    def save(self, folder: Path, rank: int) -> None:
        """Write model.pt (full weights) and engine.pt (optimizer, scheduler) from rank 0."""
        self.save_weights(folder, rank)
        if rank != 0:
            return
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "micro": self.micro},
                   folder / "engine.pt")

    def load(self, folder: Path) -> None:
        self.load_model_state(load_file(folder / "model.pt"))
        state = load_file(folder / "engine.pt")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}/engine.pt: optimizer state does not fit "
                                  f"optim.name={self.cfg.optim.name!r} ({e})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro = int(state["micro"])


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names and exact bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint file "
                              f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                              ) from None


class DDPEngine(PlainEngine):
    """torch DistributedDataParallel over the existing process group."""

    name = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not dist.is_initialized():
            raise ConfigError("train.engine=ddp: no torch.distributed process group; run with "
                              "scaling.num_workers >= 1 (Ray Train sets it up)")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _sync_context(self) -> contextlib.AbstractContextManager:
        # skip the all-reduce on micro batches that do not end an optimizer step
        return contextlib.nullcontext() if self._boundary() else self.model.no_sync()

    def save_weights(self, folder: Path, rank: int) -> None:
        """As the plain engine, plus replicas.json: every rank's weight digest (they must agree)."""
        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, state_digest(self.module))
        super().save_weights(folder, rank)
        if rank == 0:
            (folder / "replicas.json").write_text(json.dumps({"sha256": digests}))


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 0-3 (CPU accelerator + gloo when there is no CUDA)."""

    name = "deepspeed"

    def __init__(self, cfg: RunConfig, module: nn.Module, device: torch.device, total_steps: int):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("train.engine=deepspeed: the deepspeed package is not installed "
                              "(pip install --no-build-isolation deepspeed)") from None
        if not dist.is_initialized():
            raise ConfigError("train.engine=deepspeed: needs a process group; run with "
                              "scaling.num_workers >= 1")
        self.cfg = cfg
        self.device = device
        self.accum = cfg.train.grad_accum
        self.micro = 0
        self.dtype = None
        self.module = module
        optimizer = create_optimizer(cfg.optim, module)
        scheduler = create_scheduler(cfg.optim, optimizer, total_steps)
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.ds_config = deepspeed_config(cfg, dist.get_world_size(), device, trained)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.stage = cfg.train.zero_stage

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself

    def step(self) -> bool:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        self.micro += 1
        return bool(boundary)

    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:  # parameters are partitioned: gather them (collective call)
            state = self.model._zero3_consolidated_16bit_state_dict() or {}
        else:
            state = self.module.state_dict()
        return checkpoint_state(self.module, {k: v.detach().float().cpu()
                                              for k, v in state.items()})

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist.get_rank() == 0:
                    self.module.load_state_dict(state, strict=False)
        else:
            load_checkpoint_state(self.module, state, "checkpoint")

    def save(self, folder: Path, rank: int) -> None:
        # every rank writes its ZeRO shard; rank 0 also writes the consolidated weights
        # an adapted model's frozen backbone comes back from its pretrained files instead
        self.model.save_checkpoint(str(folder), tag="deepspeed",
                                   exclude_frozen_parameters=has_adapter(self.module))
        self.save_weights(folder, rank)

    def load(self, folder: Path) -> None:
        if not (folder / "deepspeed").is_dir():
            raise CheckpointError(f"{folder}: no DeepSpeed state (was it written by another "
                                  f"engine? train.engine must match)")
        path, _ = self.model.load_checkpoint(str(folder), tag="deepspeed",
                                             load_module_strict=not has_adapter(self.module))
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load its checkpoint")
        self.micro = int(self.model.global_steps * self.accum)


BUCKET = 50_000_000  # most elements per communication bucket: 200 MB in fp32
MIN_BUCKET = 1_000_000
BUCKET_ALIGN = 64  # elements (MIN_BUCKET and BUCKET are multiples of it)


def bucket_size(trained: int | None) -> int:
    """Elements per reduce/all-gather bucket: a tenth of the trained parameters, within
    [MIN_BUCKET, BUCKET]. ZeRO-3 allocates its gradient bucket up front, and a fixed 200 MB
    one was 44 % of a 45 M-parameter model's per-worker model state (benchmarks/zero_memory).
    A multiple of BUCKET_ALIGN: DeepSpeed asserts the all-gather bucket is a multiple of its
    alignment factor (2), and a tenth of an odd count (GPT-2 medium's 354,823,169) is odd."""
    if trained is None:
        return BUCKET
    return max(MIN_BUCKET, min(BUCKET, trained // 10 // BUCKET_ALIGN * BUCKET_ALIGN))


def deepspeed_config(cfg: RunConfig, world_size: int, device: torch.device,
                     trained: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config derived from ours (``trained``: parameters with gradients, which
    sizes the communication buckets); batch sizes must agree."""
    t = cfg.train
    train_batch = t.batch_size * t.grad_accum * world_size
    ds: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = ds["zero_optimization"]
    if t.zero_stage >= 1:  # DeepSpeed's default buckets (5e8 elements) cost 2 GB each in fp32
        bucket = bucket_size(trained)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if t.offload and t.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        ds["zero_force_ds_cpu_optimizer"] = False  # our torch optimizer steps on the CPU copy
    if t.offload_params and t.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    dtype = autocast_dtype(cfg, device)
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    check_batch_sizes(ds, world_size)
    return ds


def check_batch_sizes(ds: dict[str, Any], world_size: int) -> None:
    micro = ds["train_micro_batch_size_per_gpu"]
    accum = ds["gradient_accumulation_steps"]
    total = ds["train_batch_size"]
    if micro * accum * world_size != total:
        raise ConfigError(
            f"DeepSpeed batch sizes disagree: train_batch_size={total} but micro ({micro}) x "
            f"grad accumulation ({accum}) x world size ({world_size}) = "
            f"{micro * accum * world_size}; set train.batch_size / train.grad_accum")


def _auto(cfg: RunConfig, module: nn.Module, device: torch.device, total_steps: int) -> Engine:
    """DDP when a process group of more than one rank exists, else plain."""
    return (DDPEngine if world()[1] > 1 else PlainEngine)(cfg, module, device, total_steps)


ENGINES: Registry[Callable[..., Engine]] = Registry("engine", "train.engine")
ENGINES.register("auto", _auto)
ENGINES.register("plain", PlainEngine)
ENGINES.register("ddp", DDPEngine)
ENGINES.register("deepspeed", DeepSpeedEngine)


def create_engine(cfg: RunConfig, module: nn.Module, device: torch.device,
                  total_steps: int) -> Engine:
    return ENGINES.get(cfg.train.engine)(cfg, module, device, total_steps)
