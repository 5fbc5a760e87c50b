"""DeepSpeed ZeRO-1 and ZeRO-3 on 2 CPU workers (gloo): MiniLM fine-tunes and exports plain weights."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import CONFIGS, need_shared

from trainers.errors import ConfigError
from trainers.recipe import load_config

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def test_inconsistent_batch_sizes_are_refused_with_the_numbers() -> None:
    pytest.importorskip("torch")
    from trainers.engines import check_batch_sizes

    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match=r"train_batch_size=32 but micro \(4\) x grad "
                                          r"accumulation \(2\) x world size \(2\) = 16"):
        check_batch_sizes(ds, world_size=2)
    check_batch_sizes(ds, world_size=4)  # 4 x 2 x 4 = 32 agrees


def test_communication_buckets_scale_with_the_trained_parameters(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    from trainers.engines import BUCKET, MIN_BUCKET, deepspeed_config

    cfg = load_config(CONFIGS / "tiny-digits.yaml", [f"train.output_dir={tmp_path}",
                                                      "train.engine=deepspeed",
                                                      "train.zero_stage=3"])
    cpu = torch.device("cpu")

    def bucket(trained: int | None) -> int:
        zero = deepspeed_config(cfg, 2, cpu, trained)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"]
        return zero["reduce_bucket_size"]

    assert bucket(45_000_000) == 4_499_968  # a tenth of the model (to 64), not a fixed 200 MB
    assert bucket(354_823_169) == 35_482_304  # aligned: DeepSpeed refuses an odd bucket
    assert bucket(10_000) == MIN_BUCKET and bucket(10**10) == bucket(None) == BUCKET
    zero0 = deepspeed_config(cfg.replace({"train.zero_stage": 0}), 2, cpu, 45_000_000)
    assert "reduce_bucket_size" not in zero0["zero_optimization"]


@pytest.mark.ray
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_exports_weights_a_plain_model_scores_alike(
        local_ray, tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    import torch

    need_shared("data", "text", "sst2")
    from cluster.train import train_distributed
    from trainers.batches import Batcher
    from trainers.checkpoints import load_checkpoint_model
    from trainers.data import load_dataset
    from trainers.engines import PlainEngine
    from trainers.loop import evaluate
    from trainers.models import create_model

    cfg = load_config(CONFIGS / "sst2-minilm.yaml", [
        f"train.output_dir={tmp_path}", "train.progress=false", "data.shots=4",
        "data.max_test=16", "train.max_steps=3", "train.batch_size=4", "train.eval_every=3",
        "train.engine=deepspeed", f"train.zero_stage={stage}", "scaling.num_workers=2",
        "scaling.cpus_per_worker=1"])
    start = time.perf_counter()
    result = train_distributed(cfg)
    elapsed = time.perf_counter() - start
    assert result.metrics["steps"] == 3 and result.metrics["finished"] == 1
    final = result.run_dir / "checkpoints" / "final"
    assert (final / "model.pt").is_file()

    # the exported weights load strictly into a plain model and reproduce the reported scores
    data = load_dataset(cfg.data)
    built = load_checkpoint_model(cfg, final, data.num_classes)
    engine = PlainEngine(cfg, built.module, torch.device("cpu"), total_steps=1)
    again = evaluate(engine, Batcher(cfg, built, engine.device), data.test, data.num_classes,
                     cfg.train.eval_batch_size, "test")
    for key in ("test/accuracy", "test/f1", "test/mcc"):
        assert again[key] == pytest.approx(result.metrics[key], abs=1e-9), key
    # and they are the trained weights, gathered whole (ZeRO-3 partitions them): the pretrained
    # backbone moved, and every tensor has its full shape
    pretrained = create_model(cfg.model, data.num_classes)
    exported = built.module.state_dict()
    moved = [k for k, v in pretrained.module.state_dict().items()
             if not k.startswith(built.head_prefixes) and not torch.equal(v, exported[k])]
    assert moved, "the backbone in model.pt equals the pretrained one"
    print(f"\nZeRO-{stage}: {elapsed:.1f} s, test/accuracy {result.metrics['test/accuracy']:.4f} "
          f"(re-evaluated from model.pt: {again['test/accuracy']:.4f})")
