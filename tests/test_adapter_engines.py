"""A LoRA run on every engine (DDP, DeepSpeed ZeRO 0-3, offload) of 2 Ray Train workers: it
trains the adapter and head only and checkpoints only them; resuming the finished run trains
nothing and returns its result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_hf import make_tiny_hf, write_text_dataset

from trainers.recipe import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENGINES = {
    "ddp": ["train.engine=ddp"],
    "zero0": ["train.engine=deepspeed", "train.zero_stage=0"],
    "zero1": ["train.engine=deepspeed", "train.zero_stage=1"],
    "zero2": ["train.engine=deepspeed", "train.zero_stage=2"],
    "zero3": ["train.engine=deepspeed", "train.zero_stage=3"],
    "zero3-offload": ["train.engine=deepspeed", "train.zero_stage=3", "train.offload=true",
                      "train.offload_params=true"],
}


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("tiny-text")
    return make_tiny_hf(root / "bert", "bert"), write_text_dataset(root / "data")


def run(model: Path, data: Path, out: Path, engine: str, *extra: str):
    from cluster.train import train_distributed

    cfg = load_config(None, [
        "name=lora-engine", "data.format=text", f"data.root={data}", "data.shots=12",
        f"model.name=hf:{model}", "model.pretrained=false", "model.adapter=lora",
        "model.adapter_params={r: 4}", "optim.lr=1e-2", "optim.schedule=constant",
        "optim.warmup=0", "train.batch_size=4", "train.max_steps=4", "train.eval_every=2",
        f"train.output_dir={out}", "train.progress=false", "train.run_name=r",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", *ENGINES[engine], *extra])
    return train_distributed(cfg)


def final_state(result) -> dict[str, torch.Tensor]:
    return torch.load(result.run_dir / "checkpoints" / "final" / "model.pt", weights_only=True)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_lora_on_each_engine_trains_checkpoints_adapter_only_and_resumes_exactly(
        local_ray, tiny_text, tmp_path: Path, engine: str) -> None:
    if engine != "ddp":
        pytest.importorskip("deepspeed")
    model, data = tiny_text
    whole = run(model, data, tmp_path / "whole", engine)
    assert whole.metrics["steps"] == 4
    state = final_state(whole)
    assert state and all("lora_" in k or k.startswith("head.") for k in state)
    assert any(bool(v.abs().sum()) for k, v in state.items() if "lora_B" in k)  # B left zero

    # asking the finished run again trains nothing and gives its weights back (exact resume of
    # an interrupted adapter run is tested in process, tests/test_adapters.py)
    again = run(model, data, tmp_path / "whole", engine, "train.resume=true")
    assert again.metrics == whole.metrics
    assert final_state(again).keys() == state.keys()
    if engine.startswith("zero"):  # DeepSpeed's own shards skip the frozen backbone too
        ckpt = whole.run_dir / "checkpoints" / "final"
        assert (ckpt / "model.pt").stat().st_size < 200_000
