"""The bad-input catalogue: each input fails fast with one line naming the culprit, exit 2.

Every case goes through the real command line (``launch.main``) up to the point of failure, and
none may escape as a traceback.
"""

from __future__ import annotations

from pathlib import Path

from conftest import CONFIGS, need_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import launch
from trainers.config import RunConfig
from trainers.errors import ConfigError
from trainers.recipe import load_config

TINY = str(CONFIGS / "tiny-digits.yaml")


def _text_dataset(root: Path, train: str, test: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.tsv").write_bytes(train.encode("utf-8") if isinstance(train, str) else train)
    if test is not None:
        (root / "test.tsv").write_text(test)
    return root


def _images(root: Path, sizes: list[tuple[int, int]], modes: list[str] | None = None) -> Path:
    from PIL import Image

    for i, size in enumerate(sizes):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new((modes or ["RGB"] * len(sizes))[i], size).save(d / f"{i}.png")
    return root


HEADER = "label\tlabel_text\ttext\n"


def recipe_writer(folder: Path):
    """recipe(name, text) -> the path of a recipe file written into ``folder``."""
    folder.mkdir()

    def recipe(name: str, text: str | bytes) -> str:
        p = folder / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(p)
    return recipe


def cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what, argv, text the one-line message must contain)."""
    recipe = recipe_writer(tmp / "recipes")

    text_ok = HEADER + "0\tn\tbad\n1\tp\tgood\n0\tn\tawful\n1\tp\tgreat\n"
    ds = {
        "latin1": _text_dataset(tmp / "latin1", HEADER.encode() + b"0\tn\tcaf\xe9\n"),
        "ragged": _text_dataset(tmp / "ragged", HEADER + "0\tn\tok\n1\tp\n"),
        "label_range": _text_dataset(tmp / "range", text_ok, HEADER + "7\tx\tnew class\n"),
        "one_class": _text_dataset(tmp / "one", HEADER + "0\tn\ta\n0\tn\tb\n"),
        "bad_label": _text_dataset(tmp / "badlabel", HEADER + "0\tn\ta\npos\tp\tb\n"),
        "empty_text": _text_dataset(tmp / "empty", HEADER + "0\tn\ta\n1\tp\t \n"),
        "no_column": _text_dataset(tmp / "nocol", "label\tsentence\n0\ta\n1\tb\n"),
    }
    mixed = _images(tmp / "mixed", [(8, 8), (8, 8), (16, 16), (8, 8)])
    corrupt = _images(tmp / "corrupt", [(8, 8), (8, 8)])
    (corrupt / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    weights_trunc = tmp / "trunc.th"
    weights_trunc.write_bytes(b"PK\x03\x04\x14")
    weights_wrong = tmp / "wrong.th"
    import torch

    torch.save({"state_dict": {"conv1.weight": torch.zeros(3, 3)}}, weights_wrong)
    # model.params={}: tiny-digits' params belong to its mlp, not to the models swapped in here
    text = ["data.format=text", "model.name=minilm", "model.params={}", "data.shots=1",
            "data.test_split=null"]

    def on(ds_root: Path, *extra: str) -> list[str]:
        return ["train", TINY, *text, f"data.root={ds_root}", *extra]

    return [
        # recipes
        ("missing recipe", ["train", str(tmp / "nope.yaml")], "file not found"),
        ("unknown section", ["train", recipe("a.yaml", "optimm: {lr: 1}\n")], "did you mean 'optim'"),
        ("unknown key", ["train", recipe("b.yaml", "optim:\n  nme: sgd\n")], "line 2: optim.nme"),
        ("wrong type", ["train", recipe("c.yaml", "train:\n  epochs: many\n")], "train.epochs"),
        ("out of range", ["train", recipe("d.yaml", "optim:\n  lr: -1\n")], "out of range"),
        ("invalid yaml", ["train", recipe("e.yaml", "optim: {lr: 1\n")], "invalid YAML"),
        ("not a mapping", ["train", recipe("f.yaml", "- 1\n- 2\n")], "mapping of sections"),
        ("duplicate key", ["train", recipe("g.yaml", "optim:\n  lr: 1\n  lr: 2\n")], "duplicate key"),
        ("recipe not utf-8", ["train", recipe("h.yaml", b"name: caf\xe9\n")], "not UTF-8"),
        ("bad literal", ["train", recipe("i.yaml", "train:\n  precision: int4\n")], "train.precision"),
        # overrides
        ("override without =", ["train", TINY, "optim.lr"], "expected key=value"),
        ("override unknown key", ["train", TINY, "optim.lrr=1"], "did you mean 'lr'"),
        ("override bad value", ["train", TINY, "data.shots=-2"], "data.shots"),
        ("unknown optimizer", ["train", TINY, "optim.name=adamm"], "did you mean 'adam'"),
        ("unknown model", ["train", TINY, "model.name=vit"], "unknown model 'vit'"),
        ("unknown strategy", ["train", TINY, "model.strategy=magic"], "model.strategy"),
        ("unknown augment policy", ["train", TINY, "augment.policy=warp"], "augment.policy"),
        ("unknown augment param", ["train", TINY, "augment.policy=classic",
                                   "augment.params={rotatoin: 3}"], "did you mean 'rotation'"),
        ("text policy on images", ["train", TINY, "augment.policy=deletion"], "augment.policy"),
        ("fractional multi-GPU", ["train", TINY, "scaling.num_workers=2", "scaling.use_gpu=true",
                                  "scaling.gpus_per_worker=0.5"], "scaling.gpus_per_worker"),
        ("fold out of range", ["train", TINY, "data.folds=3", "data.fold=3"], "data.fold"),
        ("folds beside a held-out set", ["train", TINY, "data.folds=2", "data.val_shots=4"],
         "data.folds=2 with data.val_shots=4"),
        ("missing data root", ["train", TINY, "data.format=text", f"data.root={tmp}/none"],
         "data.root"),
        ("missing weights file", ["train", TINY, f"model.weights={tmp}/none.th"], "model.weights"),
        # datasets
        ("K larger than a class", ["train", TINY, "data.shots=500"], "data.shots=500"),
        ("dataset not utf-8", on(ds["latin1"]), "line 2: not UTF-8"),
        ("ragged row", on(ds["ragged"]), "line 3: 2 fields"),
        ("label out of range", on(ds["label_range"], "data.test_split=test"),
         "label 7 never occurs"),
        ("one class only", on(ds["one_class"]), "only one class"),
        ("label not an integer", on(ds["bad_label"]), "label 'pos'"),
        ("empty text", on(ds["empty_text"]), "empty text"),
        ("missing column", on(ds["no_column"]), "missing column 'text'"),
        ("images of mixed sizes", ["train", TINY, "data.format=image_folder",
                                   f"data.root={mixed}", "data.test_split=null", "data.shots=1",
                                   "data.channels=3", "data.mean=[0.5,0.5,0.5]",
                                   "data.std=[0.5,0.5,0.5]"], "data.image_size"),
        ("corrupt jpeg", ["train", TINY, "data.format=image_folder", f"data.root={corrupt}",
                          "data.test_split=null", "data.shots=1", "data.channels=3",
                          "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"],
         "broken.jpg: unreadable image"),
        # checkpoints
        ("truncated checkpoint", ["train", TINY, "model.name=cifar_resnet20", "model.params={}",
                                  f"model.weights={weights_trunc}"], "trunc.th"),
        ("wrong architecture", ["train", TINY, "model.name=cifar_resnet20", "model.params={}",
                                f"model.weights={weights_wrong}"], "do not fit"),
        # output
        ("unwritable output dir", ["train", TINY, f"train.output_dir={weights_wrong}"],
         "cannot write"),
    ]


def test_catalogue(tmp_path, capsys):
    """≥ 30 bad inputs, each refused with one clear line and exit status 2."""
    table = cases(tmp_path)
    assert len(table) >= 30
    failures = []
    for what, argv, needle in table:
        code = launch.main([*argv, f"train.output_dir={tmp_path / 'runs'}"]
                           if "train.output_dir" not in " ".join(argv) else argv)
        err = capsys.readouterr().err.strip()
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        ok = code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err
        if not ok:
            failures.append(f"{what}: exit {code}, stderr {err[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_shared_data_paths_are_checked_when_present():
    need_shared("data", "text", "sst2")
    assert load_config(CONFIGS / "sst2-minilm.yaml").data.root.endswith("sst2")


# --------------------------------------------------------------------------------------------
# Property: any YAML either loads into a valid RunConfig or raises ConfigError

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
section_keys = st.sampled_from(["data", "model", "optim", "augment", "train", "scaling", "tune",
                                "name", "bogus"])
field_keys = st.sampled_from(["lr", "name", "shots", "epochs", "format", "policy", "strength",
                              "num_workers", "seed", "mode", "params", "betas", "space", "x"])
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(field_keys, inner, max_size=3)), max_leaves=6)
recipes = st.one_of(values, st.dictionaries(section_keys, st.one_of(
    scalars, st.dictionaries(field_keys, values, max_size=4)), max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(recipes)
def test_any_yaml_is_a_runconfig_or_a_config_error(tmp_path, recipe):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        cfg = load_config(path, check_paths=False)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
    else:
        assert isinstance(cfg, RunConfig)
