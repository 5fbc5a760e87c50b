"""peft adapters (LoRA, IA3): checked up front, trained by every strategy, saved as adapter +
head only, resumed exactly; searchable as `model.adapter_params.*` in a Tune space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interrupts import Interrupt, interrupted_at
from tiny_hf import make_tiny_hf, write_text_dataset

from trainers.errors import ConfigError
from trainers.recipe import load_config

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-text")
    return make_tiny_hf(root / "bert", "bert"), write_text_dataset(root / "data")


def recipe(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        "name=tiny-lora", "data.format=text", f"data.root={data}", "data.shots=12",
        f"model.name=hf:{model}", "model.pretrained=false", "model.pooling=mean",
        "model.adapter=lora", "model.adapter_params={r: 4, lora_alpha: 8}",
        "optim.lr=3e-2", "optim.schedule=constant", "optim.warmup=0", "train.batch_size=4",
        "train.epochs=4", f"train.output_dir={out}", "train.progress=false", "train.seed=3", "train.num_threads=1",
        *extra])


@pytest.mark.parametrize("overrides, expected", [
    (["model.adapter_params.rank=8"], (r"adapter_params.rank: not a parameter of peft's "
                                      r"LoraConfig .*did you mean 'r'\?")),
    (["model.adapter_params.lora_alpah=8"], r"did you mean 'lora_alpha'\?"),
    (["model.adapter_params.r=eight"], r"adapter_params.r: expected an integer, got 'eight'"),
    (["model.adapter=ia3", "model.adapter_params.r=8"], r"not a parameter of peft's IA3Config"),
    (["model.adapter=none", "model.adapter_params.r=8"], r"set model.adapter"),
    (["model.adapter=lorra"], r"model.adapter: 'lorra' is not allowed .*did you mean 'lora'"),
    (["model.freeze_backbone=true"], r"model.freeze_backbone: not with model.adapter=lora"),
])
def test_bad_adapter_params_fail_up_front_in_one_line(overrides, expected) -> None:
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(None, ["data.format=digits", "model.name=mlp", "model.adapter=lora",
                           *overrides])
    assert "\n" not in str(e.value)


def test_target_modules_that_do_not_exist_name_the_linear_layers(tiny_text) -> None:
    from trainers.models import create_model

    model, data = tiny_text
    cfg = recipe(model, data, Path("."), "model.adapter_params={target_modules: [qkv]}")
    with pytest.raises(ConfigError, match=r"target_modules: .*linear layers here: query, key, "
                                          r"value") as e:
        create_model(cfg.model, 2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_adapter_trains_only_adapter_and_head_and_checkpoints_only_them(
        tiny_text, tmp_path: Path, adapter: str) -> None:
    from trainers.adapters import count_parameters
    from trainers.checkpoints import load_checkpoint_model
    from trainers.loop import fit
    from trainers.models import create_model

    model, data = tiny_text
    cfg = recipe(model, data, tmp_path, f"model.adapter={adapter}",
                 *(["model.adapter_params={}"] if adapter == "ia3" else []))
    torch.manual_seed(cfg.train.seed)
    before = create_model(cfg.model, 2).module.state_dict()
    result = fit(cfg)
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < 0.8 * losses[0]
    final = torch.load(result.run_dir / "checkpoints" / "final" / "model.pt", weights_only=True)
    built = load_checkpoint_model(cfg, result.run_dir / "checkpoints" / "final", 2)
    trainable, total = count_parameters(built.module)
    assert sum(v.numel() for v in final.values()) == trainable < total / 4
    assert all(adapter in k or k.startswith("head.") for k in final)
    # the backbone is the one the run started from; the adapter and head moved
    after = built.module.state_dict()
    frozen = [k for k in before if k not in final]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in final)


def test_adapter_run_resumes_exactly(tiny_text, tmp_path: Path) -> None:
    from trainers.loop import fit

    model, data = tiny_text
    full = fit(recipe(model, data, tmp_path / "a"))
    with pytest.raises(Interrupt):  # a crash right after the second checkpoint
        fit(recipe(model, data, tmp_path / "b"), interrupted_at(2, key="epoch"))
    resumed = fit(recipe(model, data, tmp_path / "b", "train.resume=true"))
    assert resumed.steps == full.steps
    assert resumed.metrics["test/accuracy"] == full.metrics["test/accuracy"]
    a = torch.load(full.run_dir / "checkpoints/final/model.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoints/final/model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["lp-ft", "contrastive"])
def test_adapter_works_with_the_few_shot_strategies(tiny_text, tmp_path: Path,
                                                    strategy: str) -> None:
    from trainers.loop import fit

    model, data = tiny_text
    cfg = recipe(model, data, tmp_path, f"model.strategy={strategy}", "train.epochs=0",
                 "model.strategy_params={contrastive: {iterations: 2, lr: 1.0e-2}}")
    result = fit(cfg)  # epochs=0: the prepared model alone (probe head, pair-trained adapter)
    assert result.metrics["test/accuracy"] > 0.7
    final = torch.load(result.run_dir / "checkpoints/final/model.pt", weights_only=True)
    lora_b = [v for k, v in final.items() if "lora_B" in k]
    moved = any(bool(v.abs().sum()) for v in lora_b)  # LoRA's B starts at zero
    assert moved == (strategy == "contrastive")  # only the pair stage trains the adapter


def test_adapter_params_are_a_tune_search_dimension(tiny_text, tmp_path: Path) -> None:
    from cluster.tune import parse_space

    model, data = tiny_text
    cfg = recipe(model, data, tmp_path, "tune.space={model.adapter_params.r: 'grid[4, 16]'}",
                 "tune.search=grid", "data.folds=2")
    space = parse_space(cfg)
    assert space.grid_size(grid=True) == 2
    bad = recipe(model, data, tmp_path, "tune.space={model.adapter_params.rank: 'grid[4, 16]'}")
    with pytest.raises(ConfigError, match="did you mean 'r'"):
        parse_space(bad)
