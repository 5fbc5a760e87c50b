"""Config loading, overrides and validation: every bad input names its culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS

from trainers.config import RunConfig, from_dict
from trainers.errors import ConfigError
from trainers.recipe import load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_recipes_in_configs_load():
    from trainers.stages import is_staged, load_stages

    for recipe in sorted(CONFIGS.glob("*.yaml")):
        cfgs = (load_stages(recipe, check_paths=False) if is_staged(recipe)
                else [load_config(recipe, check_paths=False)])
        assert cfgs and all(isinstance(cfg, RunConfig) for cfg in cfgs)


def test_recipes_point_at_the_shared_data():
    # a recipe's relative root is read from configs/, so ../shared (one level short) slips by
    # check_paths=False above; where the shared data is present, every such root must exist
    from trainers.stages import is_staged, load_stages

    shared = CONFIGS.parent.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("no ../shared/data next to the checkout")
    for recipe in sorted(CONFIGS.glob("*.yaml")):
        cfgs = (load_stages(recipe, check_paths=False) if is_staged(recipe)
                else [load_config(recipe, check_paths=False)])
        for cfg in cfgs:
            if "shared" in cfg.data.root:
                assert Path(cfg.data.root).exists(), f"{recipe.name}: {cfg.data.root}"


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(CONFIGS / "tiny-digits.yaml",
                      ["optim.lr=3e-4", "data.shots=8", "model.freeze_backbone=true",
                       "optim.betas=[0.8, 0.99]", "augment.params={rotation: 20, flip: true}"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.shots == 8
    assert cfg.model.freeze_backbone is True
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.augment.params == {"rotation": 20, "flip": True}


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny-digits.yaml", ["optim.lr=0.01"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_replace_revalidates():
    cfg = load_config(CONFIGS / "tiny-digits.yaml")
    assert cfg.replace({"optim.name": "sgd"}).optim.name == "sgd"
    with pytest.raises(ConfigError, match="optim.lr"):
        cfg.replace({"optim.lr": -1})


BAD_RECIPES = [
    ("model:\n  hidden: 16\n", ["line 2", "model.hidden: moved to model.params.hidden"]),
    ("model:\n  contrastive_lr: 1.0e-3\n",
     ["model.contrastive_lr: moved to model.strategy_params.contrastive.lr"]),
    ("data: {format: digits}\nmodel:\n  name: mlp\n  params: {hiden: 8}\n",
     ["model.params.hiden: unknown parameter of model 'mlp'", "did you mean 'hidden'"]),
    ("data: {format: digits}\nmodel:\n  name: mlp\n  params: {hidden: 2.5}\n",
     ["model.params.hidden", "expected int", "line 4"]),
    ("optim:\n  nme: adam\n", ["optim.nme", "did you mean 'name'", "line 2"]),
    ("optim:\n  lr: fast\n", ["optim.lr", "expected a number", "line 2"]),
    ("train:\n  epochs: -3\n", ["train.epochs", "out of range"]),
    ("train:\n  epochs: 2.5\n", ["train.epochs", "integer"]),
    ("data:\n  format: parquet\n", ["data.format", "'parquet'", "allowed"]),
    ("dat:\n  shots: 4\n", ["dat", "did you mean 'data'"]),
    ("model:\n  freeze_backbone: maybe\n", ["model.freeze_backbone", "true/false"]),
    ("data:\n  format: text\n", ["data.root", "required"]),
    ("data:\n  format: digits\n  folds: 4\n  fold: 4\n", ["data.fold", "0..3"]),
    ("optim:\n  betas: [0.9]\n", ["optim.betas", "two values"]),
    ("train:\n  precision: int8\n", ["train.precision", "allowed"]),
    ("optim: [1, 2]\n", ["optim", "mapping"]),
    ("data: {format: digits\n", ["invalid YAML", "line"]),
    ("- just\n- a list\n", ["mapping of sections"]),
    ("optim:\n  lr: 1\n  lr: 2\n", ["duplicate key", "lr"]),
    ("optim:\n  lr: .nan\n", ["optim.lr", "NaN"]),
    ("scaling:\n  num_workers: 2\n  use_gpu: true\n  gpus_per_worker: 0.5\n",
     ["scaling.gpus_per_worker", "fractional"]),
]


@pytest.mark.parametrize("text,needles", BAD_RECIPES, ids=[n[0] for _, n in BAD_RECIPES])
def test_bad_recipe_is_named(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg.strip()
    assert str(path) in msg or "override" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("override,needle", [
    ("model.contrastive_iterations=3",
     "override .model.contrastive_iterations=3.: model.contrastive_iterations: moved to "
     "model.strategy_params.contrastive.iterations"),
    ("optim.lr", "expected key=value"),
    ("optim.lr=-1", "override .optim.lr=-1.: optim.lr: -1.0 is out of range"),
    ("optim.lrr=0.1", "did you mean 'lr'"),
    ("nosuch.key=1", "nosuch"),
    ("data.shots=many", "data.shots"),
    ("train.mode=maximum", "train.mode"),
])
def test_bad_override_is_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / "tiny-digits.yaml", [override])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="recipe .*nope.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="data.root: '/no/such/dir' does not exist"):
        load_config(CONFIGS / "sst2-minilm.yaml", ["data.root=/no/such/dir"])
    with pytest.raises(ConfigError, match="model.weights"):
        load_config(CONFIGS / "tiny-digits.yaml", ["model.weights=/no/such.th"])


def test_not_utf8_recipe(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        from_dict([1, 2])  # type: ignore[arg-type]


def test_one_search_space_entry_is_set_by_its_dotted_name(tmp_path):
    cfg = load_config(CONFIGS / "tiny-digits.yaml", [
        f"train.output_dir={tmp_path}", "tune.space={optim.lr: 'loguniform[1e-4, 1e-2]'}",
        "tune.space.train.epochs=grid[1, 2]", "tune.space.optim.lr=grid[1e-3]"])
    assert cfg.tune.space == {"optim.lr": "grid[1e-3]", "train.epochs": "grid[1, 2]"}
