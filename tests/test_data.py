"""Loaders, the few-shot sampler and k-fold: real files, real rows, clear errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import need_shared

from trainers.config import DataConfig
from trainers.data import load_dataset, sample_few_shot, stratified_folds
from trainers.errors import DataError

LABELS = [0] * 30 + [1] * 20 + [2] * 12


def test_sampler_exact_k_per_class_and_deterministic():
    a = sample_few_shot(LABELS, 8, seed=3)
    assert Counter(LABELS[i] for i in a) == {0: 8, 1: 8, 2: 8}
    assert a == sample_few_shot(LABELS, 8, seed=3)
    assert a != sample_few_shot(LABELS, 8, seed=4)


def test_sampler_refuses_short_class():
    with pytest.raises(DataError, match="class 2 .* only 12"):
        sample_few_shot(LABELS, 13, seed=0)


def test_kfold_disjoint_covering_stratified():
    folds = stratified_folds(LABELS, 4, seed=1)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == list(range(len(LABELS)))  # coverage, no overlap
    for f in folds:
        counts = Counter(LABELS[i] for i in f)
        assert abs(counts[0] - 30 / 4) <= 1 and abs(counts[2] - 12 / 4) <= 1
    assert folds == stratified_folds(LABELS, 4, seed=1)


def test_kfold_split_in_load_dataset_keeps_test_apart():
    cfg = DataConfig(format="digits", channels=1, mean=[0.3], std=[0.4], shots=10, folds=5,
                     fold=2, seed=1)
    d = load_dataset(cfg)
    assert len(d.train) == 80 and len(d.val) == 20
    assert not set(d.train.sources) & set(d.val.sources)
    assert not set(d.train.sources + d.val.sources) & set(d.test.sources)


def _tsv(tmp_path: Path, rows: list[str], name: str = "train.tsv") -> Path:
    (tmp_path / name).write_text("label\tlabel_text\ttext\n" + "\n".join(rows) + "\n")
    return tmp_path


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="text", root=str(root), test_split=None, shots=1, **kw)


def test_text_loader_reads_rows(tmp_path):
    root = _tsv(tmp_path, ["0\tneg\tbad film", "1\tpos\tgood film", "0\tneg\tawful",
                           "1\tpos\tgreat"])
    d = load_dataset(_cfg(root))
    assert d.classes == ["neg", "pos"] and len(d.train) == 2 and len(d.test) == 2


@pytest.mark.parametrize("rows,needle", [
    (["0\tneg\tok", "x\tpos\tgood"], "line 3: label 'x'"),
    (["0\tneg\tok", "1\tpos\t   "], "line 3: empty text"),
    (["0\tneg\tok", "1\tpos"], "line 3: 2 fields"),
    (["0\tneg\tok", "-1\tpos\tgood"], "line 3: label -1"),
    (["0\tneg\tok", "0\tneg\tfine"], "only one class"),
])
def test_malformed_rows_name_file_and_line(tmp_path, rows, needle):
    root = _tsv(tmp_path, rows)
    with pytest.raises(DataError, match=needle) as e:
        load_dataset(_cfg(root))
    assert "train.tsv" in str(e.value) or "one class" in str(e.value)


def test_missing_column_and_encoding(tmp_path):
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\thi\n")
    with pytest.raises(DataError, match="missing column 'text'"):
        load_dataset(_cfg(tmp_path))
    (tmp_path / "train.tsv").write_bytes(b"label\tlabel_text\ttext\n0\tn\tcaf\xe9\n")
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        load_dataset(_cfg(tmp_path))


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text('y,sentence\n0,"bad, really"\n1,good\n0,meh\n1,fine\n')
    d = load_dataset(_cfg(tmp_path, text_column="sentence", label_column="y",
                          label_text_column=None))
    assert len(d.train) == 2
    (tmp_path / "train.csv").unlink()
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
                                          '{"text": "c", "label": 0}\n{"text": "d", "label": 1}\n'
                                          'not json\n')
    with pytest.raises(DataError, match="train.jsonl line 5: invalid JSON"):
        load_dataset(_cfg(tmp_path))


def test_unreadable_image_is_named(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "0.png")
    (tmp_path / "train" / "b" / "1.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    cfg = DataConfig(format="image_folder", root=str(tmp_path), test_split=None, shots=1)
    with pytest.raises(DataError, match=r"1\.jpg: unreadable image"):
        load_dataset(cfg)


def test_shared_sst2_few_shot():
    root = need_shared("data", "text", "sst2")
    cfg = DataConfig(format="text", root=str(root), shots=16, seed=5, max_test=100)
    d = load_dataset(cfg)
    assert d.classes == ["negative", "positive"]
    assert Counter(d.train.labels.tolist()) == {0: 16, 1: 16}
    assert len(d.test) == 100
    assert all(":" in s for s in d.train.sources)


def test_shared_cifar_images_and_shortage():
    root = need_shared("data", "images", "cifar10")
    cfg = DataConfig(format="image_folder", root=str(root), shots=5, max_test=50)
    d = load_dataset(cfg)
    assert d.train.inputs.shape == (50, 3, 32, 32)
    assert 0.0 <= float(d.train.inputs.min()) and float(d.train.inputs.max()) <= 1.0
    with pytest.raises(DataError, match="data.shots=500: class 0 .* only 200"):
        load_dataset(DataConfig(format="image_folder", root=str(root), shots=500))
